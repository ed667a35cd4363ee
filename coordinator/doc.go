// Package coordinator runs one Kiln coordinator: a Raft node, leader-only loops, forwarding and the HTTP surface.
package coordinator
