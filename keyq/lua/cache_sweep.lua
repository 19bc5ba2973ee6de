-- One bounded sweep step: keep the cache within its size, least recently read out first.
-- KEYS[1] recency index (zset, score = last read or write in ms), KEYS[2] read counts (zset).
-- ARGV[1] cache key prefix, ARGV[2] max keys, ARGV[3] batch (most entries touched here),
-- ARGV[4] cache ttl_ms, ARGV[5] tombstone ttl_ms, ARGV[6] most read-count members kept.
-- A dropped entry keeps its version as a short-lived tombstone, so that a read-through fill
-- that loaded an older state from the Repo cannot bring it back.
-- Returns {expired members removed, entries dropped, index size after, read counts trimmed}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local batch = tonumber(ARGV[3])
-- members not read nor written for a whole TTL: their entry has expired already
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[4])),
  'LIMIT', 0, batch)
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
end
local dropped = 0
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
local room = batch - #expired
if excess > 0 and room > 0 then
  local victims = redis.call('ZRANGE', KEYS[1], 0, math.min(excess, room) - 1)
  for _, member in ipairs(victims) do
    local key = ARGV[1] .. member
    if redis.call('HDEL', key, 's') == 1 then
      redis.call('PEXPIRE', key, ARGV[5])
      dropped = dropped + 1
    end
    redis.call('ZREM', KEYS[1], member)
  end
end
local trimmed = 0
local hot = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if hot > 0 then
  trimmed = redis.call('ZREMRANGEBYRANK', KEYS[2], 0, math.min(hot, batch) - 1)
end
return {#expired, dropped, redis.call('ZCARD', KEYS[1]), trimmed}
