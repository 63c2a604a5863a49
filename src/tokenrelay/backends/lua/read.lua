-- The events after a cursor and what a reader needs to know besides, atomically.
-- KEYS: events, meta.  ARGV: after, max events.
-- Returns {-1} when the run does not exist, {-2, dropped} when events after the cursor were
-- dropped, else {sealed (0 or 1), events}: the events as one JSON array of [seq, type, data],
-- so that a reader decodes a whole batch in one call instead of parsing a reply per field.
local state = redis.call('HMGET', KEYS[2], 'sealed', 'dropped')
if not state[1] then
  return {-1}
end
local dropped = tonumber(state[2])
if tonumber(ARGV[1]) < dropped then
  return {-2, dropped}
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
if #entries == 0 then
  return {tonumber(state[1]), ''}
end
local parts = {}
for i, entry in ipairs(entries) do
  -- entry = {'<seq>-0', {'t', type, 'd', data}}; type names need no escaping.
  parts[i] = '[' .. string.sub(entry[1], 1, -3) .. ',"' .. entry[2][2] .. '",' .. entry[2][4] .. ']'
end
return {tonumber(state[1]), '[' .. table.concat(parts, ',') .. ']'}
