-- The next batch, taken in the post-commit pipeline of the batch before it (after its settle),
-- so a worker under a steady stream moves from batch to batch with one Redis round trip: what
-- waits in the partitions this node holds, in turn, up to ARGV[1] messages in all, each
-- partition's into its own in-flight list under its lease (drain.lua: stopping before a message
-- delivered more than once before, which the broker fetch hands over alone).
-- KEYS: (queue, in-flight list, lease) per partition; ARGV[1] room, ARGV[i + 1] the lease value
-- of partition i. A queue's wake list is '<queue>:wake' (as in claim.lua).
-- Returns {i, messages, ...} for each partition i (1-based) whose in-flight list holds anything
-- afterwards, the WHOLE list: a pipeline run twice (NOSCRIPT) returns what both runs took, and
-- nothing taken can be left unread in an in-flight list; {i, -1} where the lease is not ours.
-- A queue emptied here loses its wake token: it would only wake its consumer to find nothing.
local room = tonumber(ARGV[1])
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local queue, inflight, lease = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local waiting = 0
  if room > 0 then
    waiting = redis.call('LLEN', queue)
  end
  if waiting > 0 or redis.call('LLEN', inflight) > 0 then
    local value = ARGV[i + 2]
    if redis.call('GET', lease) ~= value then
      out[#out + 1] = i + 1
      out[#out + 1] = -1
    else
      if waiting > 0 then
        local got = drain({queue, inflight, lease}, {math.min(room, waiting), value})
        room = room - #got
        if redis.call('LLEN', queue) == 0 then
          redis.call('DEL', queue .. ':wake')
        end
      end
      local held = redis.call('LRANGE', inflight, 0, -1)
      if #held > 0 then
        out[#out + 1] = i + 1
        out[#out + 1] = held
      end
    end
  end
end
return out
