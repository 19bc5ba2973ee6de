-- Register names (entity/key -> node) only while the writer's partition lease is still the one
-- it holds: a stale owner's late post-commit write must not overwrite the new owner's names.
-- KEYS[1] the partition's lease, KEYS[2..] name keys; ARGV[1] the lease value the writer holds,
-- ARGV[2] node id, ARGV[3] name TTL in ms. Returns the number of names set, or -1 if fenced.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[3])
end
return #KEYS - 1
