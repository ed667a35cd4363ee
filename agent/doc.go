// Package agent is Kiln's builder: it registers with the coordinators, long-polls for leases, builds with the local Nix, streams logs and uploads zstd NARs.
package agent
