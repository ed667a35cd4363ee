package gossip

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/hashicorp/memberlist"
)

// Role says what kind of process a pool member is.
type Role string

// Roles of pool members.
const (
	RoleCoordinator Role = "coordinator"
	RoleAgent       Role = "agent"
)

// MetaMaxSize is the largest encoded Meta memberlist accepts (512 bytes).
const MetaMaxSize = memberlist.MetaMaxSize

// ErrMetaTooLarge is returned (wrapped) when an encoded Meta exceeds
// MetaMaxSize bytes.
var ErrMetaTooLarge = errors.New("gossip: node meta too large")

// Meta is what a member advertises about itself. It travels in every
// memberlist alive message, so it is JSON with short keys and must stay
// within MetaMaxSize bytes once encoded.
type Meta struct {
	Role     Role     `json:"r,omitempty"`
	NodeID   string   `json:"n,omitempty"`  // coordinator's Raft server ID
	HTTPAddr string   `json:"h,omitempty"`  // coordinator's HTTP/RPC address
	RaftAddr string   `json:"ra,omitempty"` // coordinator's Raft transport address
	AgentID  string   `json:"a,omitempty"`  // agent's ID
	Systems  []string `json:"s,omitempty"`  // Nix systems an agent builds for
	Features []string `json:"f,omitempty"`  // Nix system features an agent supports
	MaxJobs  uint32   `json:"j,omitempty"`  // agent's concurrent job limit
	Version  string   `json:"v,omitempty"`  // kiln version
}

// Encode returns the wire form of m. It fails with an error wrapping
// ErrMetaTooLarge when the result would exceed MetaMaxSize bytes.
func (m Meta) Encode() ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("gossip: encoding meta: %w", err)
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes encoded, limit %d", ErrMetaTooLarge, len(b), MetaMaxSize)
	}
	return b, nil
}

// DecodeMeta parses the wire form produced by Meta.Encode. Unknown keys are
// ignored so newer members can add fields.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) == 0 {
		return m, errors.New("gossip: decoding meta: empty")
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return Meta{}, fmt.Errorf("gossip: decoding meta: %w", err)
	}
	return m, nil
}

// clone returns a deep copy of m, so callers can't alias the pool's slices.
func (m Meta) clone() Meta {
	if m.Systems != nil {
		m.Systems = append([]string(nil), m.Systems...)
	}
	if m.Features != nil {
		m.Features = append([]string(nil), m.Features...)
	}
	return m
}
