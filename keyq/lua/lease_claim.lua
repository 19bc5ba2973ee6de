-- Claim a partition lease when nobody holds it; the fencing token grows with every grant.
-- KEYS[1] lease key, KEYS[2] fence counter ; ARGV[1] owner id, ARGV[2] ttl_ms
-- Returns the new token, or 0 when another owner holds the lease, or -token when we hold it.
local holder = redis.call('GET', KEYS[1])
if holder then
  local owner, token = string.match(holder, '^(.*)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return -tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
