-- Take the next message of the first non-empty queue AND record it as unacknowledged, in one
-- atomic step (kombu's BRPOP leaves it in limbo until the worker has read it; a crash there
-- lost it). A message of an acked queue that is not kombu's format (not JSON, no delivery tag)
-- cannot be delivered: it moves to '<queue>:poison' for the partition's owner to dead-letter.
-- A queue with a claim plan (a partition this worker holds) does better: its message is
-- claimed at once into the partition's in-flight list under the plan's lease, with the rest of
-- a batch's first step (claim_batch.lua: more of the queue, its poison list, which other
-- claimed queues wait), so the fetch and the claim are one round trip, with the same crash
-- safety (the next owner restores in-flight lists). A message with an ETA or an expiry is
-- recorded, never claimed: Celery holds it first.
-- KEYS[1..n] queue lists in the order to try, KEYS[n+1] kombu's unacked hash, KEYS[n+2] its
-- unacked_index zset, then per plan j: KEYS[n+1+2j] the partition's lease, KEYS[n+2+2j] its
-- in-flight list.
-- ARGV[1] the number of plans, [2] a batch's room, [3] its poison room, [4] most messages one
-- drain step takes; ARGV[4+i] queue i's flag: '0' consumed without acks (control replies:
-- nothing recorded), '1' with acks, 'c<j>' claimed by plan j; then per plan j ARGV[3+n+2j] the
-- lease value (owner|token), ARGV[4+n+2j] '1' when no batch has served that partition since
-- it was taken over (the others then take only a fair share of the room, as claim_batch.lua).
-- Returns {queue, payload, 1 recorded | 0 not recorded | 2 moved to poison, messages left in
-- that queue}; {queue, payload, 3 claimed, left, drained, poison, {queue, length, ...} of the
-- other claimed queues that wait, share of the room}; {queue, '', 4 (the lease is not the
-- plan's: the message is back at the head, its owner woken), left}; or false.
-- The payload bytes are stored as they are; JSON is decoded only to read its properties.
local plans = tonumber(ARGV[1])
local n = #KEYS - 2 - 2 * plans
local flags = 4  -- ARGV[flags + i]: queue i's flag
local values = flags + n  -- ARGV[values + 2j - 1], ARGV[values + 2j]: plan j's lease value, fresh
local function plan_of(i)
  local flag = ARGV[flags + i]
  if string.sub(flag, 1, 1) == 'c' then return tonumber(string.sub(flag, 2)) end
  return nil
end
-- claim.lua's and claim_batch.lua's steps for message m of queue i, plan j
local function claim_fetched(i, j, m, headers)
  local queue = KEYS[i]
  local lease, inflight = KEYS[n + 1 + 2 * j], KEYS[n + 2 + 2 * j]
  local value = ARGV[values + 2 * j - 1]
  if redis.call('GET', lease) ~= value then
    redis.call('RPUSH', queue, m)
    redis.call('LPUSH', queue .. ':wake', 1)  -- its owner may be idle: wake it now
    redis.call('LTRIM', queue .. ':wake', 0, 0)
    return {queue, '', 4, redis.call('LLEN', queue)}
  end
  redis.call('RPUSH', inflight, m)
  local count = tonumber(headers['keyq-deliveries']) or 0
  local found, drained, share = {}, {}, 0
  if count <= 1 then  -- delivered more than once before: applied alone (see drain.lua)
    local others, fresh = {}, false
    for k = 1, n do
      local other = plan_of(k)
      if other and other ~= j then
        others[#others + 1] = KEYS[k]
        fresh = fresh or ARGV[values + 2 * other] == '1'
      end
    end
    local waiting = nonempty(others, {})
    for w = 1, #waiting, 2 do
      found[#found + 1] = others[waiting[w]]
      found[#found + 1] = waiting[w + 1]
    end
    local room = tonumber(ARGV[2])
    share = room
    if fresh and #waiting > 0 and room > 0 then
      share = math.max(1, math.floor(room / (1 + #waiting / 2)))
    end
    if share > 0 then
      drained = drain({queue, inflight, lease}, {math.min(share, tonumber(ARGV[4])), value})
    end
  end
  local poison = drain({queue .. ':poison', inflight, lease}, {ARGV[3], value, '1'})
  return {queue, m, 3, redis.call('LLEN', queue), drained, poison, found, share}
end

for i = 1, n do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    local flag = ARGV[flags + i]
    if flag == '0' then
      return {KEYS[i], m, 0, redis.call('LLEN', KEYS[i])}
    end
    local ok, doc = pcall(cjson.decode, m)
    if not (ok and type(doc) == 'table' and type(doc.properties) == 'table'
        and type(doc.properties.delivery_tag) == 'string') then
      redis.call('RPUSH', KEYS[i] .. ':poison', m)
      return {KEYS[i], '', 2, redis.call('LLEN', KEYS[i])}
    end
    local j = plan_of(i)
    local headers = doc.headers
    if type(headers) ~= 'table' then headers = {} end
    if j and type(headers.eta) ~= 'string' and type(headers.expires) ~= 'string' then
      return claim_fetched(i, j, m, headers)
    end
    local info = doc.properties.delivery_info
    if type(info) ~= 'table' then info = {} end
    local exchange = info.exchange
    if type(exchange) ~= 'string' then exchange = '' end
    local routing_key = info.routing_key
    if type(routing_key) ~= 'string' then routing_key = KEYS[i] end
    local t = redis.call('TIME')
    local tag = doc.properties.delivery_tag
    redis.call('HSET', KEYS[n + 1], tag,
      '[' .. m .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
    redis.call('ZADD', KEYS[n + 2], tonumber(t[1]) + tonumber(t[2]) / 1000000, tag)
    return {KEYS[i], m, 1, redis.call('LLEN', KEYS[i])}
  end
end
return false
