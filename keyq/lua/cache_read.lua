-- One cache read in one round trip: the entry, its read counters and its recency.
-- KEYS[1] cache key, KEYS[2] recency index (zset), KEYS[3] read counts (zset),
-- KEYS[4] stats hash (hits, misses). ARGV[1] member "entity:key".
-- Returns {version, state} on a hit, nil on a miss (absent, expired or swept to a tombstone).
local got = redis.call('HMGET', KEYS[1], 'v', 's')
redis.call('ZINCRBY', KEYS[3], 1, ARGV[1])
if got[1] and got[2] then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'hits', 1)
  return got
end
redis.call('HINCRBY', KEYS[4], 'misses', 1)
return false
