-- Drop a cache entry only if it still holds the version the caller compared (reconciler).
-- KEYS[1] cache key, KEYS[2] recency index. ARGV[1] expected version ('' = any),
-- ARGV[2] member "entity:key". Returns 1 if dropped, 0 if the entry moved on meanwhile.
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
