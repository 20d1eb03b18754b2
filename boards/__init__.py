"""Board profiles (TOML), read by edgeface.board_profiles."""
