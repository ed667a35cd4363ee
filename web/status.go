package web

import (
	"net/http"
	"strings"
	"time"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// ClusterStatus is what a coordinator knows of the cluster and its cache.
type ClusterStatus struct {
	Node         string              `json:"node"`
	Leader       string              `json:"leader"`
	Coordinators []CoordinatorStatus `json:"coordinators"`
	Cache        CacheStatus         `json:"cache"`
}

// CoordinatorStatus is one Raft member as seen from the answering node.
type CoordinatorStatus struct {
	ID           string `json:"id"`
	HTTPAddr     string `json:"http_addr"`
	RaftAddr     string `json:"raft_addr"`
	Voter        bool   `json:"voter"`
	Leader       bool   `json:"leader"`
	RaftState    string `json:"raft_state"`
	AppliedIndex uint64 `json:"applied_index"`
	Reachable    bool   `json:"reachable"`
}

// CacheStatus sizes the binary cache.
type CacheStatus struct {
	NarInfos        int    `json:"narinfos"`
	NarBytes        uint64 `json:"nar_bytes"`
	CompressedBytes uint64 `json:"compressed_bytes"`
	LocalBlobs      int    `json:"local_blobs"`
}

// CapabilityJSON is a system and feature set live agents offer.
type CapabilityJSON struct {
	System      string   `json:"system"`
	Features    []string `json:"features"`
	Agents      int      `json:"agents"`
	FreeSlots   int      `json:"free_slots"`
	CanBuildNow bool     `json:"can_build_now"`
}

// QueueJSON is the unfinished work for one system and feature set.
type QueueJSON struct {
	System      string   `json:"system"`
	Features    []string `json:"features"`
	Runnable    int      `json:"runnable"`
	Waiting     int      `json:"waiting"`
	Running     int      `json:"running"`
	CanBuildNow bool     `json:"can_build_now"`
	Reason      string   `json:"reason,omitempty"`
}

// AgentStatusJSON is one registered agent.
type AgentStatusJSON struct {
	ID                string   `json:"id"`
	Name              string   `json:"name"`
	Systems           []string `json:"systems"`
	Features          []string `json:"features"`
	MandatoryFeatures []string `json:"mandatory_features"`
	MaxJobs           uint32   `json:"max_jobs"`
	Leases            int      `json:"leases"`
	Load              float64  `json:"load"`
	Live              bool     `json:"live"`
	LastHeartbeat     *string  `json:"last_heartbeat"`
	// Gossip is "reachable" or "unreachable" (alive, or dead/left, in the
	// answering node's view of the gossip pool), or "heartbeats-only" for
	// an agent that is not in the pool (behind NAT, or no gossip).
	Gossip string `json:"gossip"`
}

// StatusJSON is /api/v1/status.
type StatusJSON struct {
	AgentsKnown  bool              `json:"agents_known"`
	Capabilities []CapabilityJSON  `json:"capabilities"`
	Queue        []QueueJSON       `json:"queue"`
	Agents       []AgentStatusJSON `json:"agents"`
	Cluster      ClusterStatus     `json:"cluster"`
}

func nonNil(xs []string) []string {
	if xs == nil {
		return []string{}
	}
	return xs
}

func (a *api) status(w http.ResponseWriter, r *http.Request) {
	rd := a.cfg.Backend.Read()
	wc := a.waitingReasons(r.Context(), rd)
	last := wc.last
	out := StatusJSON{AgentsKnown: wc.known, Capabilities: []CapabilityJSON{}, Queue: []QueueJSON{}, Agents: []AgentStatusJSON{},
		Cluster: a.cfg.Backend.Cluster(r.Context())}
	agents, err := rd.Agents()
	if err != nil {
		WriteError(w, err)
		return
	}
	caps := map[string]*CapabilityJSON{}
	pool := a.cfg.Backend.GossipAgents()
	for _, ag := range agents {
		seen, live := last[ag.Id]
		st := AgentStatusJSON{ID: ag.Id, Name: ag.Name, Systems: nonNil(ag.Systems), Features: nonNil(ag.SupportedFeatures),
			MandatoryFeatures: nonNil(ag.MandatoryFeatures), MaxJobs: ag.MaxJobs, Leases: wc.leases[ag.Id], Live: live,
			Gossip: "heartbeats-only"}
		switch state, ok := pool[ag.Id]; {
		case !ok:
		case state == "alive":
			st.Gossip = "reachable"
		default:
			st.Gossip = "unreachable"
		}
		st.Load = float64(st.Leases) / float64(max(ag.MaxJobs, 1))
		if live {
			t := seen.UTC().Format(time.RFC3339)
			st.LastHeartbeat = &t
		}
		out.Agents = append(out.Agents, st)
		if !live {
			continue
		}
		free := max(int(max(ag.MaxJobs, 1))-wc.leases[ag.Id], 0)
		for _, sys := range ag.Systems {
			k := sys + "|" + raftfsm.FeaturesKey(ag.SupportedFeatures)
			c := caps[k]
			if c == nil {
				c = &CapabilityJSON{System: sys, Features: nonNil(ag.SupportedFeatures)}
				caps[k] = c
			}
			c.Agents++
			c.FreeSlots += free
			c.CanBuildNow = c.FreeSlots > 0
		}
	}
	for _, k := range sortedMapKeys(caps) {
		out.Capabilities = append(out.Capabilities, *caps[k])
	}
	queue := map[string]*QueueJSON{}
	for _, st := range []pb.StepState{pb.StepState_STEP_STATE_RUNNABLE, pb.StepState_STEP_STATE_WAITING, pb.StepState_STEP_STATE_LEASED} {
		each, err := rd.StepsIn(nil, st)
		if err != nil {
			WriteError(w, err)
			return
		}
		each(func(s raftfsm.StepRef) bool {
			system, features := s.System(), s.RequiredFeatures()
			k := system + "|" + raftfsm.FeaturesKey(features)
			q := queue[k]
			if q == nil {
				q = &QueueJSON{System: system, Features: nonNil(features)}
				// Whether a runnable step of this kind would be leased now.
				q.Reason, q.CanBuildNow = wc.placement(system, features)
				if q.CanBuildNow {
					q.Reason = ""
				}
				queue[k] = q
			}
			switch st {
			case pb.StepState_STEP_STATE_RUNNABLE:
				q.Runnable++
			case pb.StepState_STEP_STATE_WAITING:
				q.Waiting++
			default:
				q.Running++
			}
			return true
		})
	}
	for _, k := range sortedMapKeys(queue) {
		out.Queue = append(out.Queue, *queue[k])
	}
	WriteJSON(w, http.StatusOK, out)
}

// statusShort is 200 {"ok":true}, or 503 with the reason when there is no
// leader or no live agent.
func (a *api) statusShort(w http.ResponseWriter, r *http.Request) {
	leader := a.cfg.Backend.Leader()
	var reasons []string
	if leader == "" {
		reasons = append(reasons, "no leader")
	}
	last, known := a.cfg.Backend.LiveAgents(r.Context())
	switch {
	case !known && leader != "":
		reasons = append(reasons, "the leader did not say which agents are live")
	case known && len(last) == 0:
		reasons = append(reasons, "no live agent")
	}
	if len(reasons) > 0 {
		WriteJSON(w, http.StatusServiceUnavailable, map[string]any{"ok": false, "reason": strings.Join(reasons, "; ")})
		return
	}
	WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
}
