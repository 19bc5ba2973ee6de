-- Compare-and-set of cached states: never move an entry back to an older version.
-- KEYS[1] the recency index (zset: member "entity:key", score = last read or write, ms);
-- KEYS[2..n+1] cache keys. ARGV[1] ttl_ms, then (version, state_json, member) per cache key.
-- An entry is written when it is absent, older, or a tombstone (version kept, state dropped by
-- a sweep) of the same version: so a read-through fill of an older state loses to a newer
-- write even when the newer entry was swept meanwhile. Returns the number of entries written.
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local written = 0
for i = 2, #KEYS do
  local base = 3 * (i - 2)
  local version = tonumber(ARGV[base + 2])
  local cur = redis.call('HMGET', KEYS[i], 'v', 's')
  local current = tonumber(cur[1])
  if (not current) or current < version or (current == version and not cur[2]) then
    redis.call('HSET', KEYS[i], 'v', ARGV[base + 2], 's', ARGV[base + 3])
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', KEYS[1], now, ARGV[base + 4])
    written = written + 1
  end
end
return written
