-- Membership heartbeat on the Redis server's clock, so node clocks never matter.
-- KEYS[1] members zset (score = last heartbeat ms), KEYS[2] this member's info key
-- ARGV[1] node id, ARGV[2] ttl_ms, ARGV[3] info json
-- Drops members silent for longer than the TTL; returns the live members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
return redis.call('ZRANGE', KEYS[1], 0, -1)
