-- drain.lua for several partitions in one round trip (the worker's cross-partition group
-- commit): KEYS are (queue, in-flight list, lease) triples, ARGV (count, lease value) pairs,
-- one of each per partition. drain() is defined above this body (keyq.scripts.compose).
-- Returns one reply per partition, in order: its messages, or false when the lease is not ours.
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local got = drain({KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]},
                    {ARGV[2 * i + 1], ARGV[2 * i + 2]})
  if got then
    out[#out + 1] = got
  else
    out[#out + 1] = -1
  end
end
return out
