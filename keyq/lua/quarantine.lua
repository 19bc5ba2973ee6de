-- A fetched message that can never be applied (unknown task, encoding, content type, unreadable
-- body): out of kombu's unacked records and onto '<queue>:poison', where the partition's owner
-- dead-letters it with its raw bytes. KEYS[1] unacked hash, KEYS[2] unacked_index, KEYS[3] the
-- poison list. ARGV[1] delivery tag, ARGV[2] the raw message.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
