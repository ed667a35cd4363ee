// Package cache is Kiln's Nix binary cache: signing keys, narinfo, NAR hashing and the blob store.
package cache
