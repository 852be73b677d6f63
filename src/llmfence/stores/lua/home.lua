-- home.lua: a request id's home on a Redis Cluster (see stores/_redis_shards.py).
--
-- A request's checks can live on several slots; each slot's part is admitted and settled by
-- admit.lua and settle.lua there. The home, on a slot of its own (tagged by the request id),
-- is where the slots meet: the admission writes in it which slots it reserves on before it
-- reserves anywhere, and a settlement or release reads it before it settles anywhere, so
-- whichever reaches the home first decides, exactly as one script on one node would.
--
-- KEYS[1]  the home, absent or cjson {s = state, e = expiry, n = nonce, t = {tags}}:
--   s 'A'   an admission holds the id until e (Unix seconds, the caller's float text); t are
--           the hash tags of the slots it reserves on; n is the admitting call's nonce
--   s 'D1'  settled (its reservation): t are the slots the settlement went to
--   s 'D3'  settled without a reservation (the levels it named): t likewise
--   s 'DR'  released before any admission
--   A 'D' home is a tombstone: an admission of the id takes nothing, and a settlement sent
--   again goes to the same slots, where each part is settled once (settle.lua's tombstones).
-- ARGV[1]  the operation, ARGV[2] now (Unix seconds, float text); then
--   admit    ARGV[3] expiry, ARGV[4] TTL (ms), ARGV[5] nonce, ARGV[6 ..] tags
--            -> 'go' (reserve; also when the same call is sent again), or 'idle'
--   undo     ARGV[3] nonce: forget a refused admission (a refusal leaves nothing)
--   settle   ARGV[3] tombstone TTL (ms), ARGV[4] k, ARGV[5 .. 4+k] tags a held admission's
--            settlement also goes to (the spend log's), ARGV[5+k ..] the tags of a
--            settlement that finds no admission
--            -> 'A' and the admission's tags + ARGV[5 .. 4+k]; or 'N' and ARGV[5+k ..];
--               or the tombstone's state and tags
--   release  ARGV[3] tombstone TTL (ms): a release that finds no admission leaves 'DR'
-- Returns {state, cjson tags}.

local op, now = ARGV[1], tonumber(ARGV[2])
local raw = redis.call('GET', KEYS[1])
local home = raw and cjson.decode(raw)
if home and home.s == 'A' and tonumber(home.e) <= now then
  home = nil  -- an expired admission: the id is unknown, as an expired reservation is
end

local function tags_from(first)
  local tags = {}
  for i = first, #ARGV do
    tags[#tags + 1] = ARGV[i]
  end
  return tags
end

local function encode(tags)
  if #tags == 0 then
    return '[]'  -- cjson encodes an empty table as an object
  end
  return cjson.encode(tags)
end

if op == 'admit' then
  if home and not (home.s == 'A' and home.n == ARGV[5]) then
    return {'idle', '[]'}
  end
  redis.call('SET', KEYS[1], cjson.encode({s = 'A', e = ARGV[3], n = ARGV[5], t = tags_from(6)}),
    'PX', ARGV[4])
  return {'go', '[]'}
end

if op == 'undo' then
  if home and home.s == 'A' and home.n == ARGV[3] then
    redis.call('DEL', KEYS[1])
  end
  return {'ok', '[]'}
end

if op == 'release' then
  if not home then
    redis.call('SET', KEYS[1], cjson.encode({s = 'DR', t = {}}), 'PX', ARGV[3])
  end
  return {'ok', '[]'}
end

-- settle
local k = tonumber(ARGV[4])
if home and home.s == 'A' then
  local tags = home.t
  if type(tags) ~= 'table' then tags = {} end
  local out = {}
  for _, t in ipairs(tags) do out[#out + 1] = t end
  for i = 5, 4 + k do out[#out + 1] = ARGV[i] end
  redis.call('SET', KEYS[1], cjson.encode({s = 'D1', t = out}), 'PX', ARGV[3])
  return {'A', encode(out)}
end
if home then
  local tags = home.t
  if type(tags) ~= 'table' then tags = {} end
  return {home.s, encode(tags)}
end
local tags = tags_from(5 + k)
redis.call('SET', KEYS[1], cjson.encode({s = 'D3', t = tags}), 'PX', ARGV[3])
return {'N', encode(tags)}
