-- Renew leases this owner still holds. KEYS: lease keys ; ARGV[1] owner|token per key order
-- given as ARGV[i+1], ARGV[1] = ttl_ms. Returns a list of 1 (renewed) / 0 (lost) per key.
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
