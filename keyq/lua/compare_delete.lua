-- Delete keys only while they still hold the given value (a lease, a name, an in-flight list
-- guarded by its lease). KEYS[1] guard key, ARGV[1] expected value, KEYS[2..] keys to delete
-- (when absent, the guard key itself is deleted). Returns 1 if deleted, 0 if not ours.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if #KEYS == 1 then
  redis.call('DEL', KEYS[1])
else
  for i = 2, #KEYS do
    redis.call('DEL', KEYS[i])
  end
end
return 1
