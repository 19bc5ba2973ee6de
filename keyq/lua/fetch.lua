-- Take the next message of the first non-empty queue AND record it as unacknowledged, in one
-- atomic step (kombu's BRPOP leaves it in limbo until the worker has read it; a crash there
-- lost it). KEYS[1..n] queue lists in the order to try, KEYS[n+1] kombu's unacked hash,
-- KEYS[n+2] kombu's unacked_index zset. ARGV[i] is '1' when queue i is consumed with acks
-- (keyq's queues); other queues (control replies, consumed without acks) record nothing.
-- A message of an acked queue that is not kombu's format (not JSON, no delivery tag) cannot be
-- delivered: it moves to '<queue>:poison' for the partition's owner to dead-letter.
-- Returns {queue, payload, 1 recorded | 0 not recorded | 2 moved to poison, messages left in
-- that queue}, or false.
-- The payload bytes are stored as they are; JSON is decoded only to read the delivery tag.
local n = #KEYS - 2
for i = 1, n do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    if ARGV[i] ~= '1' then
      return {KEYS[i], m, 0, redis.call('LLEN', KEYS[i])}
    end
    local ok, doc = pcall(cjson.decode, m)
    if not (ok and type(doc) == 'table' and type(doc.properties) == 'table'
        and type(doc.properties.delivery_tag) == 'string') then
      redis.call('RPUSH', KEYS[i] .. ':poison', m)
      return {KEYS[i], '', 2, redis.call('LLEN', KEYS[i])}
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
