"""The `bloomduo` command and the tools above the services: launcher, bench, eval, demo model, cutting."""
