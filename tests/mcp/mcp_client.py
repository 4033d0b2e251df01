"""Drive an MCP server with the official Python SDK, for Warden's gateway tests.

    mcp_client.py PLAN.json -- COMMAND [ARGS...]          (stdio)
    mcp_client.py PLAN.json --url URL     (Streamable HTTP; bearer token from WARDEN_TOKEN)

PLAN.json is a list of steps; each prints one JSON line with its result:
  {"op": "list_tools"}                      -> {"tools": [names]}
  {"op": "call", "name": N, "arguments": {}, "meta": {}, "timeout": s}
                                            -> {"is_error": bool, "text": str, "meta": {...}}
                                               or {"error": str} for a JSON-RPC error
  {"op": "list_resources"} / {"op": "list_prompts"} / {"op": "ping"}
  {"op": "read_resource", "uri": "..."}
  {"op": "call_in_background", ...call fields}  starts a call, result printed when done
  {"op": "sleep", "seconds": s}
  {"op": "wait_background"}                 waits for background calls
The first line printed is {"op": "initialize", "protocol": version, "server": name}.
"""

import json
import os
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def emit(obj):
    print(json.dumps(obj), flush=True)


async def call(session, step):
    try:
        res = await session.call_tool(
            step["name"],
            step.get("arguments", {}),
            read_timeout_seconds=step.get("timeout", 30),
            meta=step.get("meta"),
        )
    except Exception as e:  # a JSON-RPC error or a transport failure
        return {"op": "call", "name": step["name"], "error": str(e)}
    text = "\n".join(getattr(c, "text", "") or "" for c in (res.content or []))
    meta = getattr(res, "meta", None) or {}
    if hasattr(meta, "model_dump"):
        meta = meta.model_dump()
    return {"op": "call", "name": step["name"], "is_error": bool(res.is_error), "text": text, "meta": meta}


async def run(session, plan):
    init = await session.initialize()
    emit({"op": "initialize", "protocol": init.protocol_version, "server": init.server_info.name})
    async with anyio.create_task_group() as tg:
        for step in plan:
            op = step["op"]
            if op == "list_tools":
                tools = await session.list_tools()
                emit({"op": op, "tools": sorted(t.name for t in tools.tools)})
            elif op == "call":
                emit(await call(session, step))
            elif op == "call_in_background":
                async def bg(step=step):
                    emit(await call(session, step))
                tg.start_soon(bg)
            elif op == "list_resources":
                res = await session.list_resources()
                emit({"op": op, "count": len(res.resources)})
            elif op == "list_prompts":
                res = await session.list_prompts()
                emit({"op": op, "count": len(res.prompts)})
            elif op == "read_resource":
                try:
                    res = await session.read_resource(step["uri"])
                    emit({"op": op, "ok": True, "count": len(res.contents)})
                except Exception as e:  # a refusal is an MCP error: report it
                    emit({"op": op, "ok": False, "error": str(e)})
            elif op == "ping":
                await session.send_ping()
                emit({"op": op, "ok": True})
            elif op == "sleep":
                await anyio.sleep(step["seconds"])
            elif op == "wait_background":
                pass  # the task group waits at its end
            else:
                raise SystemExit(f"unknown op {op}")


async def main():
    args = sys.argv[1:]
    plan = json.load(open(args[0]))
    if "--url" in args:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        url = args[args.index("--url") + 1]
        headers = {}
        # The token comes from the environment, never argv (where `ps` shows it).
        if os.environ.get("WARDEN_TOKEN"):
            headers["Authorization"] = "Bearer " + os.environ["WARDEN_TOKEN"]
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    await run(session, plan)
    else:
        cmd = args[args.index("--") + 1:]
        # Like an MCP client config's `env`: the proxy gets its token from the environment.
        params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await run(session, plan)


if __name__ == "__main__":
    anyio.run(main)
