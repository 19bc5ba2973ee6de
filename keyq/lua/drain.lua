-- Take up to ARGV[1] more messages from the head of a partition queue into its in-flight list,
-- atomically and only while ARGV[2] (owner|token) holds the partition lease KEYS[3], so a crash
-- between this and the commit loses nothing (the next owner restores the in-flight list).
-- KEYS[1] queue list (BRPOP pops from the right), KEYS[2] in-flight list, KEYS[3] lease
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return false
end
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('RPOP', KEYS[1])
  if not m then break end
  redis.call('RPUSH', KEYS[2], m)
  out[#out + 1] = m
end
return out
