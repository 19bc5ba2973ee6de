-- Membership heartbeat on the Redis server's clock, so node clocks never matter.
-- KEYS[1] members zset (score = last heartbeat ms), KEYS[2] this member's info key,
-- KEYS[3] zset of the members that take part in rendezvous assignment (not static nodes)
-- ARGV[1] node id, ARGV[2] ttl_ms, ARGV[3] info json, ARGV[4] '1' if this node is balanced,
-- ARGV[5] the prefix of member info keys
-- Drops members silent for longer than the TTL. Returns {live balanced members, info json of
-- every live member that is not balanced (static nodes: their partitions are theirs alone)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
local balanced = redis.call('ZRANGE', KEYS[3], 0, -1)
local is_balanced = {}
for _, m in ipairs(balanced) do is_balanced[m] = true end
local static = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not is_balanced[m] then
    local info = redis.call('GET', ARGV[5] .. m)
    if info then static[#static + 1] = info end
  end
end
return {balanced, static}
