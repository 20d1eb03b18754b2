"""Board profiles (TOML), read by edgeface.boards.profiles."""
