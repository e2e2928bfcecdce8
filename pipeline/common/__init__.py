"""The vocabulary both stages share: data set names and listings, layer specs, devices,
workers, array helpers and the losses. Imports nothing of featcache but ``featcache.cache``."""
