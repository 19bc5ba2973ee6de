-- The first step of a batch in one round trip: claim the delivered message (claim.lua), then,
-- only if it was claimed, drain more of its queue (drain.lua, stopping before a redelivered
-- message), take its poison list (drain.lua) and say which other held queues wait (nonempty.lua).
-- Those scripts are defined above this body as functions of (KEYS, ARGV) (keyq.scripts.compose).
-- KEYS[1] lease, [2] in-flight list, [3] unacked hash, [4] unacked_index zset, [5] queue,
-- [6] poison list, [7..] other queues held. ARGV[1] lease value, [2] delivery tag, [3] message,
-- [4] re-tagged message, [5] batch room (0: the message is applied alone), [6] poison room,
-- [7] most messages one drain step takes, [8] '1': share the room (partitions just taken over
-- wait among the others: this queue takes only its fair share, the rest is theirs, drained by
-- keyq.worker into the same batch, so every one of them moves in this batch).
-- Returns {claim status} when not claimed, else {1, drained, poison, {index, length, ...},
-- share} (share: this queue's part of the room; the worker drains on up to it).
local status = claim({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]},
                     {ARGV[1], ARGV[2], ARGV[3], ARGV[4]})
if status ~= 1 then
  return {status}
end
local others = {}
for i = 7, #KEYS do
  others[#others + 1] = KEYS[i]
end
local found = nonempty(others, {})
local room = tonumber(ARGV[5])
local share = room
if ARGV[8] == '1' and #found > 0 and room > 0 then
  share = math.max(1, math.floor(room / (1 + #found / 2)))
end
local drained = {}
if share > 0 then
  drained = drain({KEYS[5], KEYS[2], KEYS[1]}, {math.min(share, tonumber(ARGV[7])), ARGV[1]})
end
local poison = drain({KEYS[6], KEYS[2], KEYS[1]}, {ARGV[6], ARGV[1], '1'})
return {1, drained, poison, found, share}
