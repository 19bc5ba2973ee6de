-- Put messages back at the head of a queue, in order, and forget their unacked/in-flight copies.
-- KEYS[1] queue, KEYS[2] kombu unacked hash, KEYS[3] kombu unacked_index zset, KEYS[4] in-flight,
-- KEYS[5] the partition lease. ARGV[1] lease value ('' : no check, a takeover), ARGV[2] n_unacked,
-- then per unacked message (tag, payload) oldest first, then in-flight payloads oldest first.
-- Unacked messages go first: an owner of an earlier keyq version left its trigger there and the
-- rest of its batch in-flight. Today's owner claims its trigger into in-flight before it drains,
-- so both are non-empty only when the in-flight list holds a committed batch whose clearing
-- failed: duplicates, which the dedupe window skips wherever they stand.
-- Payload bytes are pushed as given (never decoded here).
-- The head is the RIGHT end (BRPOP/RPOP), so push the newest first and the oldest last.
-- Returns the number of messages put back, or -1 when the lease is not ARGV[1].
if ARGV[1] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return -1
end
local n = tonumber(ARGV[2])
local msgs = {}
for i = 1, n do
  local tag = ARGV[2 * i + 1]
  if redis.call('HEXISTS', KEYS[2], tag) == 1 then
    msgs[#msgs + 1] = ARGV[2 * i + 2]
    redis.call('HDEL', KEYS[2], tag)
    redis.call('ZREM', KEYS[3], tag)
  end
end
for i = 2 * n + 3, #ARGV do
  msgs[#msgs + 1] = ARGV[i]
end
for i = #msgs, 1, -1 do
  redis.call('RPUSH', KEYS[1], msgs[i])
end
redis.call('DEL', KEYS[4])
if #msgs > 0 then  -- wake an idle consumer now, not at its next BRPOP timeout
  redis.call('LPUSH', KEYS[1] .. ':wake', 1)
  redis.call('LTRIM', KEYS[1] .. ':wake', 0, 0)
end
return #msgs
