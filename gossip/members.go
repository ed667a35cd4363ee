package gossip

import (
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Member states reported in Member.State.
//
// memberlist v0.7.0 does not expose its suspicion state, so a suspect member
// is reported as StateAlive until it is declared dead or refutes.
const (
	StateAlive = "alive"
	StateDead  = "dead" // failed: stopped answering probes
	StateLeft  = "left" // left gracefully (Pool.Leave)
)

// Member is one pool member as this pool sees it.
type Member struct {
	Name  string
	Addr  string // gossip address, host:port
	State string // StateAlive, StateDead or StateLeft
	Meta  Meta   // last meta seen; zero if it could not be decoded
}

// EventKind is what happened to a member.
type EventKind int

// Event kinds.
const (
	// EventJoin: a member became alive (new, or back from dead/left). The
	// pool also gets one for itself while New runs.
	EventJoin EventKind = iota + 1
	// EventLeave: a member left gracefully. Rarely, when the leave intent
	// arrives after memberlist reported the departure, an EventDead for the
	// member is followed by an EventLeave.
	EventLeave
	// EventDead: a member failed (declared dead after suspicion).
	EventDead
	// EventUpdate: an alive member changed its Meta.
	EventUpdate
)

func (k EventKind) String() string {
	switch k {
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	case EventDead:
		return "dead"
	case EventUpdate:
		return "update"
	}
	return "unknown"
}

// Event reports a change to a member; Member is its state after the change.
type Event struct {
	Kind   EventKind
	Member Member
}

type memberEntry struct {
	m       Member
	changed time.Time
}

// Leave intents.
//
// memberlist's NotifyLeave fires both for a graceful leave and for a
// failure. memberlist itself knows which (a dead message whose sender is the
// node itself means "left"), but v0.7.0 never copies that into the exported
// Node.State it hands to NotifyLeave (hashicorp/memberlist#293: nodeState
// shadows Node.State), so n.State is always StateAlive there. Like Serf, a
// leaving pool therefore first gossips a small "leave intent" user message
// and only then calls memberlist's Leave; a member whose departure follows
// an intent is reported as left, any other as dead. If a future memberlist
// fills in n.State, that is used instead.

const msgLeaveIntent byte = 1

type leaveIntent struct {
	Name  string `json:"n"`
	Nonce uint64 `json:"x"`
}

// intentBroadcast is a memberlist.Broadcast carrying a leave intent.
type intentBroadcast struct {
	name string
	msg  []byte
	once sync.Once
	done chan struct{}
}

func newIntentBroadcast(in leaveIntent) *intentBroadcast {
	b, _ := json.Marshal(in) // cannot fail
	return &intentBroadcast{
		name: in.Name,
		msg:  append([]byte{msgLeaveIntent}, b...),
		done: make(chan struct{}),
	}
}

func (b *intentBroadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(*intentBroadcast)
	return ok && o.name == b.name
}
func (b *intentBroadcast) Message() []byte { return b.msg }
func (b *intentBroadcast) Finished()       { b.once.Do(func() { close(b.done) }) }

// delegate implements memberlist.Delegate and memberlist.EventDelegate for a
// Pool, keeping those methods out of Pool's exported API. memberlist calls
// the EventDelegate methods with its node lock held, so they only touch
// pool state under p.mu and never call back into memberlist.
type delegate struct{ p *Pool }

func (d delegate) NodeMeta(limit int) []byte {
	d.p.mu.Lock()
	defer d.p.mu.Unlock()
	if len(d.p.meta) > limit {
		return nil // cannot happen: Encode enforces MetaMaxSize
	}
	return d.p.meta
}

func (d delegate) NotifyMsg(b []byte) {
	if len(b) == 0 || b[0] != msgLeaveIntent {
		return
	}
	var in leaveIntent
	if err := json.Unmarshal(b[1:], &in); err != nil || in.Name == "" {
		d.p.log.Debug("gossip: ignoring malformed user message", "err", err)
		return
	}
	d.p.handleIntent(in)
}

func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.p.bcast.GetBroadcasts(overhead, limit)
}
func (d delegate) LocalState(bool) []byte          { return nil }
func (d delegate) MergeRemoteState([]byte, bool)   {}
func (d delegate) NotifyJoin(n *memberlist.Node)   { d.p.nodeEvent(EventJoin, n) }
func (d delegate) NotifyUpdate(n *memberlist.Node) { d.p.nodeEvent(EventUpdate, n) }
func (d delegate) NotifyLeave(n *memberlist.Node)  { d.p.nodeEvent(EventLeave, n) }

// nodeEvent records a memberlist notification and queues the Event.
// kind is EventLeave for every NotifyLeave; it is resolved to EventLeave or
// EventDead here.
func (p *Pool) nodeEvent(kind EventKind, n *memberlist.Node) {
	meta, err := decodeNodeMeta(n.Meta)
	if err != nil {
		p.log.Warn("gossip: member has undecodable meta", "member", n.Name, "err", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	state := StateAlive
	if kind == EventLeave {
		switch {
		case n.State == memberlist.StateLeft:
			state = StateLeft
		case n.State == memberlist.StateDead:
			state = StateDead
		case n.Name == p.cfg.Name:
			if p.leaving {
				state = StateLeft
			} else {
				state = StateDead
			}
		default:
			state = StateDead
			if at, ok := p.intents[n.Name]; ok && now.Sub(at) < p.retention {
				state = StateLeft
			}
		}
		delete(p.intents, n.Name)
		if state == StateDead {
			kind = EventDead
		}
	}
	m := Member{Name: n.Name, Addr: n.Address(), State: state, Meta: meta}
	if old, ok := p.members[n.Name]; !ok || old.m.State != StateAlive {
		if state == StateAlive {
			p.alive.Add(1)
		}
	} else if state != StateAlive {
		p.alive.Add(-1)
	}
	p.members[n.Name] = &memberEntry{m: m, changed: now}
	p.emitLocked(Event{Kind: kind, Member: m})
}

func decodeNodeMeta(b []byte) (Meta, error) {
	if len(b) == 0 {
		return Meta{}, nil // not a kiln member, or no meta yet
	}
	return DecodeMeta(b)
}

// handleIntent records a leave intent from another member and passes it on.
func (p *Pool) handleIntent(in leaveIntent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	p.pruneLocked(now)
	key := intentKey(in)
	if _, ok := p.seen[key]; ok {
		return
	}
	p.seen[key] = now
	// Re-gossip it so it spreads epidemically like memberlist's own messages.
	p.bcast.QueueBroadcast(newIntentBroadcast(in))
	if in.Name == p.cfg.Name {
		return
	}
	if e, ok := p.members[in.Name]; ok && e.m.State == StateDead && now.Sub(e.changed) < p.retention {
		// The departure overtook the intent: correct dead to left.
		e.m.State = StateLeft
		e.changed = now
		p.emitLocked(Event{Kind: EventLeave, Member: e.m})
		return
	}
	p.intents[in.Name] = now
}

func intentKey(in leaveIntent) string {
	b, _ := json.Marshal(in)
	return string(b)
}

// pruneLocked forgets dead and left members, leave intents and seen intents
// older than the retention (memberlist's GossipToTheDeadTime, after which it
// forgets dead nodes too).
func (p *Pool) pruneLocked(now time.Time) {
	for name, e := range p.members {
		if e.m.State != StateAlive && now.Sub(e.changed) >= p.retention {
			delete(p.members, name)
		}
	}
	for name, at := range p.intents {
		if now.Sub(at) >= p.retention {
			delete(p.intents, name)
		}
	}
	for k, at := range p.seen {
		if now.Sub(at) >= p.retention {
			delete(p.seen, k)
		}
	}
}

// emitLocked hands ev to the dispatcher without blocking; p.mu must be held
// so events leave in the order the member map changed.
func (p *Pool) emitLocked(ev Event) {
	if p.cfg.OnEvent == nil || p.closed.Load() {
		return
	}
	ev.Member.Meta = ev.Member.Meta.clone()
	select {
	case p.events <- ev:
	default:
		p.log.Warn("gossip: event queue full, dropping event", "kind", ev.Kind.String(), "member", ev.Member.Name)
	}
}

// dispatch calls OnEvent for each queued event until the pool shuts down.
func (p *Pool) dispatch() {
	defer p.wg.Done()
	for {
		select {
		case <-p.stop:
			return
		case ev := <-p.events:
			p.cfg.OnEvent(ev)
		}
	}
}

// Members returns every member this pool knows of, itself included, sorted
// by name: alive ones, and dead or left ones for as long as memberlist
// remembers them (GossipToTheDeadTime, 30 s with LAN defaults), with the
// last meta they advertised.
func (p *Pool) Members() []Member {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pruneLocked(time.Now())
	out := make([]Member, 0, len(p.members))
	for _, e := range p.members {
		m := e.m
		m.Meta = m.Meta.clone()
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}
