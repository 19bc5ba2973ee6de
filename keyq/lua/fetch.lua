-- Take the next message of the first non-empty queue AND record it as unacknowledged, in one
-- atomic step (kombu's BRPOP leaves it in limbo until the worker has read it; a crash there
-- lost it). KEYS[1..n-2] queue lists in the order to try, KEYS[n-1] kombu's unacked hash,
-- KEYS[n] kombu's unacked_index zset. Returns {queue, payload, recorded} (recorded: 1 when it
-- was written to unacked, 0 when it could not be read as a kombu message), or false.
-- The payload bytes are stored as they are; JSON is decoded only to read the delivery tag.
local n = #KEYS - 2
for i = 1, n do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    local recorded = 0
    local ok, doc = pcall(cjson.decode, m)
    if ok and type(doc) == 'table' and type(doc.properties) == 'table'
        and type(doc.properties.delivery_tag) == 'string' then
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
      recorded = 1
    end
    return {KEYS[i], m, recorded}
  end
end
return false
