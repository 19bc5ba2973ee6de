-- Which of the given lists hold messages: returns {index, length, ...} (index 1-based into KEYS)
-- for each non-empty one, in one round trip (the worker's cross-partition group commit asks this
-- about every other partition it holds before each batch).
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('LLEN', key)
  if n > 0 then
    out[#out + 1] = i
    out[#out + 1] = n
  end
end
return out
