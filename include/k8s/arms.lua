-- An experiment's sticky arm assignment at the Istio ingress gateway (Envoy's Lua filter, LuaJIT).
-- Istio's VirtualService weights draw each request; this keeps a customer on one arm instead: it hashes
-- the experiment's salt and the request's routing key to a bucket 0-99 and names the arm that holds the
-- bucket in a header the model's entry VirtualService routes on. The layout is the gateway's
-- (releasegate.serving.routing.choose_experiment_arm): arm i holds the buckets after the arms before it,
-- stopped or not, and a stopped arm's buckets go to the control, so stopping one arm moves only its own
-- customers. Requests without a routing key hash Envoy's x-request-id: a per-request draw by the weights.
-- `CONFIG` (host, salt, header, key_header, arms = {{version, weight, stopped}, ...}) is prepended by
-- releasegate.k8s.arms_filter.
--
-- Hand-written hashing, because Envoy's Lua has no digest function and loads no modules: FNV-1a over
-- the bytes, then MurmurHash3's 32-bit finalizer so that the low bits (the bucket) of similar keys differ.

local bxor = bit.bxor
local TWO32 = 4294967296

local function mul32(a, b)
  -- a * b mod 2^32 in doubles: b in 16-bit halves keeps every product below 2^53
  local lo, hi = b % 65536, math.floor(b / 65536)
  return (a * lo + ((a * hi) % 65536) * 65536) % TWO32
end

local function hash(text)
  local h = 2166136261
  for i = 1, #text do
    h = mul32(bxor(h, text:byte(i)) % TWO32, 16777619)
  end
  h = mul32(bxor(h, math.floor(h / 65536)) % TWO32, 0x85ebca6b)
  h = mul32(bxor(h, math.floor(h / 8192)) % TWO32, 0xc2b2ae35)
  return bxor(h, math.floor(h / 65536)) % TWO32
end

local function arm_of(key)
  local point = hash(CONFIG.salt .. ":" .. key) % 100
  local start = 0
  for _, arm in ipairs(CONFIG.arms) do
    if point >= start and point < start + arm.weight then
      if arm.stopped then
        return "control"
      end
      return arm.version
    end
    start = start + arm.weight
  end
  return "control"
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local authority = string.lower((string.gsub(headers:get(":authority") or "", ":%d+$", "")))
  if authority ~= CONFIG.host then
    return
  end
  local key = headers:get(CONFIG.key_header) or headers:get("x-request-id") or ""
  -- Always set by the gateway, never taken from the caller: a client cannot choose its arm.
  headers:remove(CONFIG.header)
  headers:add(CONFIG.header, arm_of(key))
end
