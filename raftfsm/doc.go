// Package raftfsm is Kiln's replicated state machine: commands, Apply, snapshots and indexed reads.
package raftfsm
