-- Take up to ARGV[1] more messages from the head of a list into a partition's in-flight list,
-- atomically and only while ARGV[2] (owner|token) holds the partition lease KEYS[3], so a crash
-- between this and the commit loses nothing (the next owner restores the in-flight list).
-- Unless ARGV[3] is '1', stop before a message delivered more than once before (its delivery
-- count header above 1): it is applied alone, so a poison pill cannot take its neighbours down
-- with it more than once. A message delivered once before (a takeover's in-flight batch) still
-- goes in a batch: if that batch dies too, each of its messages comes back at 2, alone.
-- KEYS[1] source list (the head is the right end), KEYS[2] in-flight list, KEYS[3] lease
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return false
end
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('LINDEX', KEYS[1], -1)
  if not m then break end
  if ARGV[3] ~= '1' and string.find(m, '"keyq-deliveries"', 1, true) then
    local n = tonumber(string.match(m, '"keyq%-deliveries"%s*:%s*(%d+)') or '2')
    if n > 1 then break end
  end
  redis.call('RPOP', KEYS[1])
  redis.call('RPUSH', KEYS[2], m)
  out[#out + 1] = m
end
return out
