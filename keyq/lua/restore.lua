-- Put messages back at the head of a queue, in order, and forget their unacked/in-flight copies.
-- KEYS[1] queue, KEYS[2] kombu unacked hash, KEYS[3] kombu unacked_index zset, KEYS[4] in-flight
-- ARGV: n_unacked, then per unacked message (tag, payload) oldest first, then in-flight payloads
-- oldest first. Payload bytes are pushed as given (never decoded here).
-- The head is the RIGHT end (BRPOP), so push the newest first and the oldest last.
local n = tonumber(ARGV[1])
local msgs = {}
for i = 1, n do
  local tag = ARGV[2 * i]
  if redis.call('HEXISTS', KEYS[2], tag) == 1 then
    msgs[#msgs + 1] = ARGV[2 * i + 1]
    redis.call('HDEL', KEYS[2], tag)
    redis.call('ZREM', KEYS[3], tag)
  end
end
for i = 2 * n + 2, #ARGV do
  msgs[#msgs + 1] = ARGV[i]
end
for i = #msgs, 1, -1 do
  redis.call('RPUSH', KEYS[1], msgs[i])
end
redis.call('DEL', KEYS[4])
return #msgs
