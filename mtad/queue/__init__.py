"""The Redis queue: keys, Lua scripts, the embedded Redis supervisor."""
