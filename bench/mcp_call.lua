-- wrk script: POST MCP tools/call requests and report latency percentiles and failures as one JSON line.
--
-- Environment: MCP_SESSION (Mcp-Session-Id to send, empty for none), MCP_VERSION (MCP-Protocol-Version),
-- MCP_TOOL (default echo), MCP_TOKEN (bearer token, optional), MCP_EXPECT (text every good answer contains),
-- MCP_VARY=1 (a different argument on every call, so no call can be answered from a cache),
-- MCP_METHOD=tools/list (list tools instead of calling echo),
-- MCP_ERA=stateless (2026-07-28: no session, `_meta` in the params, Mcp-Method/Mcp-Name routing headers).
-- Each request carries a distinct JSON-RPC id: proxies built on MCP SDKs route answers by id.

local session = os.getenv("MCP_SESSION") or ""
local version = os.getenv("MCP_VERSION") or "2025-11-25"
local tool = os.getenv("MCP_TOOL") or "echo"
local token = os.getenv("MCP_TOKEN") or ""
local expect = os.getenv("MCP_EXPECT") or "hello from wrk"
local vary = os.getenv("MCP_VARY") == "1"
local method = os.getenv("MCP_METHOD") or "tools/call"
local stateless = os.getenv("MCP_ERA") == "stateless"
local meta = ""
if stateless then
  version = "2026-07-28"
  meta = ',"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",' ..
    '"io.modelcontextprotocol/clientCapabilities":{},' ..
    '"io.modelcontextprotocol/clientInfo":{"name":"wrk","version":"1"}}'
end

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  next_id = tid * 100000000
  bad = 0
  bad_sample = ""
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Accept"] = "application/json, text/event-stream"
  wrk.headers["MCP-Protocol-Version"] = version
  if session ~= "" then wrk.headers["Mcp-Session-Id"] = session end
  if token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
  if stateless then
    wrk.headers["Mcp-Method"] = method
    if method == "tools/call" then wrk.headers["Mcp-Name"] = tool end
  end
end

function request()
  next_id = next_id + 1
  local text = "hello from wrk"
  if vary then text = text .. " " .. next_id end
  local body
  if method == "tools/call" then
    body = '{"jsonrpc":"2.0","id":' .. next_id .. ',"method":"tools/call","params":{"name":"' .. tool ..
      '","arguments":{"text":"' .. text .. '"}' .. meta .. '}}'
  elseif stateless then
    body = '{"jsonrpc":"2.0","id":' .. next_id .. ',"method":"' .. method .. '","params":{' .. string.sub(meta, 2) .. '}}'
  else
    body = '{"jsonrpc":"2.0","id":' .. next_id .. ',"method":"' .. method .. '"}'
  end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  -- A proxy that answers fast but wrong must not look good: count every answer without the echoed text.
  if status ~= 200 or not string.find(body, expect, 1, true) then
    bad = bad + 1
    if bad_sample == "" then bad_sample = status .. " " .. string.sub(body, 1, 200) end
  end
end

local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end) .. '"'
end

function done(summary, latency, requests)
  local failed, sample = 0, ""
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("bad")
    if sample == "" then sample = thread:get("bad_sample") end
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bad_answers":%d,"bad_sample":%s,' ..
    '"socket_errors":%d,"timeouts":%d,"non_2xx":%d,' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, failed, json_string(sample),
    errors.connect + errors.read + errors.write, errors.timeout, errors.status,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
