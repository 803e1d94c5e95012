"""Broadcast and presence with the official Python client (PyPI `realtime`,
vsn 1.0.0), a second implementation of the protocol beside supabase-js.

Two clients join one channel: both track presence (until each sees both),
then `bob` untracks (until `alice` sees only herself); `alice` broadcasts
with `self` on, `bob` answers once he has it, and once she has the
answer `alice` sends "end", the sentinel both wait for. Prints one JSON line with what each saw.
"""

import asyncio
import json
import os

from realtime import AsyncRealtimeClient


def channel_params(key):
    return {
        "config": {
            "broadcast": {"self": True, "ack": True},
            "presence": {"key": key, "enabled": True},
            "private": False,
        }
    }


# Set by every callback: what `until` waits on between its checks.
CHANGED = asyncio.Event()


async def until(predicate, what, within=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        CHANGED.clear()
        try:
            await asyncio.wait_for(CHANGED.wait(), deadline - loop.time())
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None


def record(got, message):
    got.append({"event": message["event"], "payload": message["payload"]})
    CHANGED.set()


async def main():
    url, key = os.environ["REALTIME_URL"], os.environ["ANON_KEY"]
    result = {"got": {"alice": [], "bob": []}, "presence": {}}
    channels = {}
    for name in ("alice", "bob"):
        client = AsyncRealtimeClient(url, key, auto_reconnect=False)
        await client.connect()
        channel = client.channel("pyroom", channel_params(name))
        for event in ("hello", "reply", "end"):
            channel.on_broadcast(event, lambda m, name=name: record(result["got"][name], m))
        channel.on_presence_sync(CHANGED.set)
        await channel.subscribe()
        channels[name] = (client, channel)
    alice, bob = channels["alice"][1], channels["bob"][1]

    await alice.track({"name": "alice"})
    await bob.track({"name": "bob"})
    keys = lambda ch: sorted(ch.presence_state().keys())
    await until(lambda: keys(alice) == ["alice", "bob"] and keys(bob) == ["alice", "bob"], "both tracked")
    result["presence"]["tracked"] = keys(alice)
    await bob.untrack()
    await until(lambda: keys(alice) == ["alice"], "bob untracked")
    result["presence"]["after_untrack"] = keys(alice)

    # (each message is sent once the one before it has been heard: no two
    # senders race)
    heard = lambda name, event: any(m["event"] == event for m in result["got"][name])
    await alice.send_broadcast("hello", {"n": 1})
    await until(lambda: heard("bob", "hello"), "the hello")
    await bob.send_broadcast("reply", {"n": 2})
    await until(lambda: heard("alice", "reply"), "the reply")
    await alice.send_broadcast("end", {})
    ended = lambda name: any(m["event"] == "end" for m in result["got"][name])
    await until(lambda: ended("alice") and ended("bob"), "the sentinel")
    for client, _ in channels.values():
        await client.close()
    print(json.dumps(result))


asyncio.run(main())
