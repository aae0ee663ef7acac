"""The minimal VM runner: load a guest, start it in the chosen mode, answer its exits, count everything."""
