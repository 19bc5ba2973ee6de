-- Take a delivered message out of kombu's unacked records into its partition's in-flight list,
-- in one step, while ARGV[1] (owner|token) holds the lease; otherwise put it back at the queue
-- head with a new delivery tag (ARGV[4]). Either way its unacked record is gone, so Celery's
-- later ack has nothing left to delete (an old owner's ack cannot hit a new owner's record).
-- KEYS[1] lease, KEYS[2] in-flight list, KEYS[3] unacked hash, KEYS[4] unacked_index zset,
-- KEYS[5] queue. ARGV[1] lease value, ARGV[2] delivery tag, ARGV[3] message, ARGV[4] re-tagged.
-- Returns 1 claimed, 0 returned to the head, -1 already restored by another owner.
local had = redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
if had == 0 then
  return -1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  return 1
end
redis.call('RPUSH', KEYS[5], ARGV[4])
redis.call('LPUSH', KEYS[5] .. ':wake', 1)  -- its owner may be idle: wake it now
redis.call('LTRIM', KEYS[5] .. ':wake', 0, 0)
return 0
