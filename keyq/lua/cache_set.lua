-- Compare-and-set of a cached state: never move an entry back to an older version.
-- KEYS: cache key 1..n ; ARGV: ttl_ms, then (version, state_json) per key.
-- Returns the number of entries written.
local ttl = tonumber(ARGV[1])
local written = 0
for i = 1, #KEYS do
  local version = tonumber(ARGV[2 * i])
  local current = redis.call('HGET', KEYS[i], 'v')
  if (not current) or tonumber(current) < version then
    redis.call('HSET', KEYS[i], 'v', ARGV[2 * i], 's', ARGV[2 * i + 1])
    redis.call('PEXPIRE', KEYS[i], ttl)
    written = written + 1
  end
end
return written
