-- Publish one message onto a queue (its left end; consumers pop from the right) with a wake
-- token for idle consumers, unless the queue already holds ARGV[2] messages or more (0: no
-- limit): a producer that outruns the workers is told so instead of filling Redis's memory.
-- KEYS[1] queue, KEYS[2] its wake list. ARGV[1] the message, ARGV[2] the depth limit.
-- Returns -1 - depth when refused, else the queue's new length.
local limit = tonumber(ARGV[2])
if limit > 0 then
  local depth = redis.call('LLEN', KEYS[1])
  if depth >= limit then
    return -1 - depth
  end
end
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], 0, 0)
return n
