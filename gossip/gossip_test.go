package gossip

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/hashicorp/memberlist"
)

// Set GOSSIP_TEST_LOG=1 to see the pools' (and memberlist's) logs.
func testLogger() *slog.Logger {
	if os.Getenv("GOSSIP_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// recorder collects a pool's events.
type recorder struct {
	mu     sync.Mutex
	events []Event
}

func (r *recorder) add(ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, ev)
}

func (r *recorder) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.events...)
}

// find returns the first event of kind for member name.
func (r *recorder) find(kind EventKind, name string) (Event, bool) {
	for _, ev := range r.all() {
		if ev.Kind == kind && ev.Member.Name == name {
			return ev, true
		}
	}
	return Event{}, false
}

type testPool struct {
	*Pool
	name string
	meta Meta
	rec  *recorder
}

func agentMeta(id string) Meta {
	return Meta{Role: RoleAgent, AgentID: id, Systems: []string{"x86_64-linux"}, Features: []string{"kvm"}, MaxJobs: 4, Version: "test"}
}

func coordMeta(id string) Meta {
	return Meta{Role: RoleCoordinator, NodeID: id, HTTPAddr: "127.0.0.1:8080", RaftAddr: "127.0.0.1:9090", Version: "test"}
}

// fast is a failure detector tuned for tests: a dead member is declared
// within about a second.
func fastConfig(name string, meta Meta) Config {
	return Config{
		Name:           name,
		BindAddr:       "127.0.0.1:0",
		Meta:           meta,
		Logger:         testLogger().With("pool", name),
		ProbeInterval:  100 * time.Millisecond,
		ProbeTimeout:   50 * time.Millisecond,
		SuspicionMult:  3,
		GossipInterval: 20 * time.Millisecond,
	}
}

// start creates a pool from cfg (OnEvent is replaced by a recorder) and
// shuts it down when the test ends.
func start(t *testing.T, cfg Config) *testPool {
	t.Helper()
	rec := &recorder{}
	cfg.OnEvent = rec.add
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg.Name, err)
	}
	t.Cleanup(func() {
		if err := p.Shutdown(); err != nil {
			t.Errorf("Shutdown(%s): %v", cfg.Name, err)
		}
	})
	return &testPool{Pool: p, name: cfg.Name, meta: cfg.Meta, rec: rec}
}

func join(t *testing.T, p *testPool, to ...*testPool) {
	t.Helper()
	var addrs []string
	for _, o := range to {
		addrs = append(addrs, o.LocalAddr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, err := p.Join(ctx, addrs); err != nil || n != len(addrs) {
		t.Fatalf("%s.Join(%v) = %d, %v; want %d, nil", p.name, addrs, n, err, len(addrs))
	}
}

// waitFor polls cond until it returns "" or the deadline passes, then fails
// with cond's last complaint.
func waitFor(t *testing.T, within time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %s", within, what, msg)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// holdsFor checks that cond keeps returning "" for the whole duration.
func holdsFor(t *testing.T, d time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if msg := cond(); msg != "" {
			t.Fatalf("%s stopped holding: %s", what, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func memberOf(p *testPool, state string) Member {
	return Member{Name: p.name, Addr: p.LocalAddr(), State: state, Meta: p.meta}
}

func wantMembers(pools ...*testPool) []Member {
	var out []Member
	for _, p := range pools {
		out = append(out, memberOf(p, StateAlive))
	}
	return out
}

var sortMembers = cmpopts.SortSlices(func(a, b Member) bool { return a.Name < b.Name })

func membersDiff(p *testPool, want []Member) string {
	if d := cmp.Diff(want, p.Members(), sortMembers, cmpopts.EquateEmpty()); d != "" {
		return fmt.Sprintf("%s.Members() mismatch (-want +got):\n%s", p.name, d)
	}
	return ""
}

func notMember(name string, pools ...*testPool) func() string {
	return func() string {
		for _, p := range pools {
			for _, m := range p.Members() {
				if m.Name == name {
					return fmt.Sprintf("%s is a member of %s: %+v", name, p.name, m)
				}
			}
		}
		return ""
	}
}

func TestPortZeroIsResolved(t *testing.T) {
	p := start(t, fastConfig("solo", agentMeta("a1")))
	host, port, err := net.SplitHostPort(p.LocalAddr())
	if err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("LocalAddr() = %q, want 127.0.0.1:<non-zero port>", p.LocalAddr())
	}
	if got := p.ml.LocalNode().Address(); got != p.LocalAddr() {
		t.Errorf("memberlist LocalNode().Address() = %q, LocalAddr() = %q", got, p.LocalAddr())
	}
	c, err := net.DialTimeout("tcp", p.LocalAddr(), time.Second)
	if err != nil {
		t.Fatalf("dialing LocalAddr: %v", err)
	}
	c.Close()
	if diff := cmp.Diff(wantMembers(p), p.Members()); diff != "" {
		t.Errorf("Members() (-want +got):\n%s", diff)
	}
	waitFor(t, 2*time.Second, "own join event", func() string {
		if ev, ok := p.rec.find(EventJoin, "solo"); !ok || !cmp.Equal(ev.Member, memberOf(p, StateAlive)) {
			return fmt.Sprintf("events: %+v", p.rec.all())
		}
		return ""
	})
	// Joining only ourselves is a no-op success: we are the first member.
	if n, err := p.Join(context.Background(), []string{p.LocalAddr()}); n != 0 || err != nil {
		t.Errorf("Join(self) = %d, %v; want 0, nil", n, err)
	}
}

func TestJoinMetaAndUpdate(t *testing.T) {
	c1 := start(t, fastConfig("coord-1", coordMeta("c1")))
	a1 := start(t, fastConfig("agent-1", agentMeta("a1")))
	a2 := start(t, fastConfig("agent-2", agentMeta("a2")))
	join(t, a1, c1)
	join(t, a2, c1)

	all := []*testPool{c1, a1, a2}
	for _, p := range all {
		waitFor(t, 5*time.Second, p.name+" to see all members", func() string {
			return membersDiff(p, wantMembers(all...))
		})
	}

	newMeta := agentMeta("a1")
	newMeta.MaxJobs = 16
	newMeta.Features = append(newMeta.Features, "big-parallel")
	if err := a1.SetMeta(newMeta); err != nil {
		t.Fatalf("SetMeta: %v", err)
	}
	a1.meta = newMeta
	for _, p := range all {
		waitFor(t, 5*time.Second, p.name+" to see the meta update", func() string {
			return membersDiff(p, wantMembers(all...))
		})
		if p == a1 {
			continue
		}
		waitFor(t, 5*time.Second, p.name+" to get an update event", func() string {
			ev, ok := p.rec.find(EventUpdate, "agent-1")
			if !ok {
				return "no update event yet"
			}
			return cmp.Diff(memberOf(a1, StateAlive), ev.Member)
		})
	}
}

func TestDeadAndLeft(t *testing.T) {
	obs := start(t, fastConfig("observer", coordMeta("c1")))
	crash := start(t, fastConfig("crasher", agentMeta("a1")))
	leave := start(t, fastConfig("leaver", agentMeta("a2")))
	join(t, crash, obs)
	join(t, leave, obs)
	all := []*testPool{obs, crash, leave}
	for _, p := range all {
		waitFor(t, 5*time.Second, p.name+" to see all members", func() string {
			return membersDiff(p, wantMembers(all...))
		})
	}

	// Shutdown without Leave: a failure.
	if err := crash.Shutdown(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*testPool{obs, leave} {
		waitFor(t, 5*time.Second, p.name+" to get a dead event for crasher", func() string {
			ev, ok := p.rec.find(EventDead, "crasher")
			if !ok {
				return fmt.Sprintf("events: %+v", p.rec.all())
			}
			return cmp.Diff(memberOf(crash, StateDead), ev.Member)
		})
	}

	// Leave, then Shutdown: graceful.
	if err := leave.Leave(2 * time.Second); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	if err := leave.Leave(time.Second); err != nil {
		t.Errorf("second Leave: %v", err)
	}
	if err := leave.SetMeta(agentMeta("a2")); !errors.Is(err, ErrClosed) {
		t.Errorf("SetMeta after Leave = %v, want ErrClosed", err)
	}
	if err := leave.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := leave.Shutdown(); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
	if err := leave.Leave(time.Second); !errors.Is(err, ErrClosed) {
		t.Errorf("Leave after Shutdown = %v, want ErrClosed", err)
	}
	waitFor(t, 5*time.Second, "observer to get a leave event for leaver", func() string {
		ev, ok := obs.rec.find(EventLeave, "leaver")
		if !ok {
			return fmt.Sprintf("events: %+v", obs.rec.all())
		}
		return cmp.Diff(memberOf(leave, StateLeft), ev.Member)
	})
	if ev, ok := obs.rec.find(EventDead, "leaver"); ok {
		t.Errorf("observer reported the graceful leaver as dead: %+v", ev)
	}
	want := []Member{memberOf(obs, StateAlive), memberOf(crash, StateDead), memberOf(leave, StateLeft)}
	if d := membersDiff(obs, want); d != "" {
		t.Error(d)
	}
}

func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// writeKeys atomically replaces path with keys, one base64 key per line.
func writeKeys(t *testing.T, path string, keys ...[]byte) {
	t.Helper()
	var b strings.Builder
	b.WriteString("# test keys\n")
	for _, k := range keys {
		b.WriteString(base64.StdEncoding.EncodeToString(k) + "\n")
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func keyedConfig(t *testing.T, name string, keys ...[]byte) Config {
	t.Helper()
	cfg := fastConfig(name, agentMeta(name))
	if len(keys) > 0 {
		cfg.KeyFile = filepath.Join(t.TempDir(), name+".keys")
		writeKeys(t, cfg.KeyFile, keys...)
	}
	return cfg
}

func keysOf(p *testPool) [][]byte { return p.keyring.GetKeys() }

func TestEncryption(t *testing.T) {
	key := newKey(t)
	p1 := start(t, keyedConfig(t, "p1", key))
	p2 := start(t, keyedConfig(t, "p2", key))
	join(t, p2, p1)
	for _, p := range []*testPool{p1, p2} {
		waitFor(t, 5*time.Second, p.name+" to see both", func() string {
			return membersDiff(p, wantMembers(p1, p2))
		})
	}

	for _, tc := range []struct {
		name string
		keys [][]byte
	}{
		{"other-key", [][]byte{newKey(t)}},
		{"no-key", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := start(t, keyedConfig(t, "stranger-"+tc.name, tc.keys...))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if n, err := s.Join(ctx, []string{p1.LocalAddr(), p2.LocalAddr()}); err == nil {
				t.Errorf("stranger Join = %d, nil; want an error", n)
			}
			holdsFor(t, time.Second, "stranger staying out", notMember(s.name, p1, p2))
			if d := membersDiff(s, wantMembers(s)); d != "" {
				t.Error(d)
			}
		})
	}
}

func TestKeyRotation(t *testing.T) {
	keyA, keyB := newKey(t), newKey(t)
	cfg1 := keyedConfig(t, "p1", keyA)
	cfg1.KeyReloadInterval = -1 // rotated with explicit ReloadKeys
	cfg2 := keyedConfig(t, "p2", keyA)
	cfg2.KeyReloadInterval = 50 * time.Millisecond // rotated by the reload loop
	p1, p2 := start(t, cfg1), start(t, cfg2)
	join(t, p2, p1)
	for _, p := range []*testPool{p1, p2} {
		waitFor(t, 5*time.Second, p.name+" to see both", func() string {
			return membersDiff(p, wantMembers(p1, p2))
		})
	}

	for _, step := range []struct {
		name string
		keys [][]byte
	}{
		{"add B as primary", [][]byte{keyB, keyA}},
		{"drop A", [][]byte{keyB}},
	} {
		writeKeys(t, cfg1.KeyFile, step.keys...)
		writeKeys(t, cfg2.KeyFile, step.keys...)
		if err := p1.ReloadKeys(); err != nil {
			t.Fatalf("%s: p1.ReloadKeys: %v", step.name, err)
		}
		if d := cmp.Diff(step.keys, keysOf(p1)); d != "" {
			t.Errorf("%s: p1 keys (-want +got):\n%s", step.name, d)
		}
		waitFor(t, 5*time.Second, step.name+": p2's reload loop", func() string {
			return cmp.Diff(step.keys, keysOf(p2))
		})
	}

	// Still talking: a meta update propagates, and nobody died.
	m := agentMeta("p1")
	m.MaxJobs = 99
	if err := p1.SetMeta(m); err != nil {
		t.Fatalf("SetMeta: %v", err)
	}
	p1.meta = m
	waitFor(t, 5*time.Second, "p2 to see p1's new meta", func() string {
		return membersDiff(p2, wantMembers(p1, p2))
	})
	for _, p := range []*testPool{p1, p2} {
		for _, ev := range p.rec.all() {
			if ev.Kind == EventDead || ev.Kind == EventLeave {
				t.Errorf("%s got %v for %s during rotation", p.name, ev.Kind, ev.Member.Name)
			}
		}
	}

	// Only the new key gets in.
	pB := start(t, keyedConfig(t, "only-B", keyB))
	join(t, pB, p1)
	for _, p := range []*testPool{p1, p2, pB} {
		waitFor(t, 5*time.Second, p.name+" to see only-B", func() string {
			return membersDiff(p, wantMembers(p1, p2, pB))
		})
	}
	pA := start(t, keyedConfig(t, "only-A", keyA))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, err := pA.Join(ctx, []string{p1.LocalAddr()}); err == nil {
		t.Errorf("only-A Join = %d, nil; want an error", n)
	}
	holdsFor(t, time.Second, "only-A staying out", notMember("only-A", p1, p2, pB))
}

func TestMetaTooLarge(t *testing.T) {
	big := agentMeta("a1")
	for i := 0; i < 40; i++ {
		big.Features = append(big.Features, fmt.Sprintf("feature-%02d", i))
	}
	if _, err := big.Encode(); !errors.Is(err, ErrMetaTooLarge) {
		t.Fatalf("Encode of a large meta = %v, want ErrMetaTooLarge", err)
	}

	t.Run("New", func(t *testing.T) {
		p, err := New(fastConfig("big", big))
		if !errors.Is(err, ErrMetaTooLarge) {
			if p != nil {
				p.Shutdown()
			}
			t.Fatalf("New = %v, want ErrMetaTooLarge", err)
		}
	})
	t.Run("SetMeta", func(t *testing.T) {
		p := start(t, fastConfig("small", agentMeta("a1")))
		if err := p.SetMeta(big); !errors.Is(err, ErrMetaTooLarge) {
			t.Fatalf("SetMeta = %v, want ErrMetaTooLarge", err)
		}
		if d := membersDiff(p, wantMembers(p)); d != "" {
			t.Errorf("meta changed after a failed SetMeta: %s", d)
		}
	})
}

func TestMetaEncoding(t *testing.T) {
	for _, tc := range []struct {
		name string
		meta Meta
	}{
		{"zero", Meta{}},
		{"agent", agentMeta("agent-7")},
		{"coordinator", coordMeta("c3")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.meta.Encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeMeta(b)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.meta, got, cmpopts.EquateEmpty()); d != "" {
				t.Errorf("round trip (-want +got):\n%s", d)
			}
		})
	}
	// Exactly at the limit is fine, one byte over is not.
	m := Meta{Version: ""}
	overhead := len(`{"v":""}`)
	m.Version = strings.Repeat("x", MetaMaxSize-overhead)
	if b, err := m.Encode(); err != nil || len(b) != MetaMaxSize {
		t.Errorf("Encode at the limit = %d bytes, %v", len(b), err)
	}
	m.Version += "x"
	if _, err := m.Encode(); !errors.Is(err, ErrMetaTooLarge) {
		t.Errorf("Encode one byte over = %v, want ErrMetaTooLarge", err)
	}
	if _, err := DecodeMeta([]byte("{")); err == nil {
		t.Error("DecodeMeta accepted bad JSON")
	}
	if _, err := DecodeMeta(nil); err == nil {
		t.Error("DecodeMeta accepted empty input")
	}
}

func TestKeyFileMode(t *testing.T) {
	for _, tc := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o644, false},
		{0o640, false},
		{0o604, false},
		{0o660, false},
		{0o600, true},
		{0o400, true},
	} {
		t.Run(fmt.Sprintf("%#o", tc.mode), func(t *testing.T) {
			cfg := keyedConfig(t, "p", newKey(t))
			if err := os.Chmod(cfg.KeyFile, tc.mode); err != nil {
				t.Fatal(err)
			}
			p, err := New(cfg)
			if p != nil {
				defer p.Shutdown()
			}
			if tc.ok && err != nil {
				t.Fatalf("New: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrInsecureKeyFile) {
				t.Fatalf("New = %v, want ErrInsecureKeyFile", err)
			}
		})
	}

	// ReloadKeys refuses too, and keeps the current keys.
	key := newKey(t)
	p := start(t, keyedConfig(t, "reload", key))
	writeKeys(t, p.cfg.KeyFile, newKey(t))
	if err := os.Chmod(p.cfg.KeyFile, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.ReloadKeys(); !errors.Is(err, ErrInsecureKeyFile) {
		t.Errorf("ReloadKeys = %v, want ErrInsecureKeyFile", err)
	}
	if d := cmp.Diff([][]byte{key}, keysOf(p)); d != "" {
		t.Errorf("keys changed (-want +got):\n%s", d)
	}
}

func TestParseKeys(t *testing.T) {
	k16, k24, k32 := bytes.Repeat([]byte{1}, 16), bytes.Repeat([]byte{2}, 24), bytes.Repeat([]byte{3}, 32)
	enc := base64.StdEncoding.EncodeToString
	for _, tc := range []struct {
		name    string
		in      string
		want    [][]byte
		wantErr string
	}{
		{"one", enc(k32) + "\n", [][]byte{k32}, ""},
		{"order and comments", "# primary first\n\n  " + enc(k16) + "  \n" + enc(k24) + "\n" + enc(k32), [][]byte{k16, k24, k32}, ""},
		{"duplicates dropped", enc(k16) + "\n" + enc(k16) + "\n", [][]byte{k16}, ""},
		{"unpadded", base64.RawStdEncoding.EncodeToString(k16), [][]byte{k16}, ""},
		{"empty", "\n# nothing\n", nil, "no keys"},
		{"bad base64", "not base64!", nil, "line 1: not valid base64"},
		{"bad length", enc(k32) + "\n" + enc([]byte("short")), nil, "line 2: key is 5 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseKeys([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("keys (-want +got):\n%s", d)
			}
		})
	}
}

func TestLogAdapter(t *testing.T) {
	for _, tc := range []struct {
		line  string
		level slog.Level
		msg   string
	}{
		{"2024/01/01 00:00:00 [DEBUG] memberlist: Stream connection from=127.0.0.1:1\n", slog.LevelDebug, "Stream connection from=127.0.0.1:1"},
		{"[INFO] memberlist: Marking p2 as failed\n", slog.LevelInfo, "Marking p2 as failed"},
		{"[WARN] memberlist: Refuting a suspect message\n", slog.LevelWarn, "Refuting a suspect message"},
		{"[ERR] memberlist: Failed to decrypt packet\n", slog.LevelError, "Failed to decrypt packet"},
		{"[ERR] Failed to shutdown transport: x\n", slog.LevelError, "Failed to shutdown transport: x"},
		{"no tag at all [x]\n", slog.LevelInfo, "no tag at all [x]"},
	} {
		var buf bytes.Buffer
		l := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug,
			ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
				if a.Key == slog.TimeKey {
					return slog.Attr{}
				}
				return a
			}}))
		NewStdLogger(l).Print(tc.line)
		want := fmt.Sprintf(`{"level":%q,"msg":%q,"component":"memberlist"}`+"\n", tc.level.String(), tc.msg)
		if d := cmp.Diff(want, buf.String()); d != "" {
			t.Errorf("%q (-want +got):\n%s", tc.line, d)
		}
	}
}

func TestRetryJoin(t *testing.T) {
	p1 := start(t, fastConfig("p1", agentMeta("p1")))
	p2 := start(t, fastConfig("p2", agentMeta("p2")))

	// Nothing listens on a just-closed port: retries until ctx ends.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := p2.RetryJoin(ctx, []string{dead}, 50*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("RetryJoin to a dead address = %v, want DeadlineExceeded", err)
	}

	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := p2.RetryJoin(ctx2, []string{dead, p1.LocalAddr(), p2.LocalAddr()}, 50*time.Millisecond); err != nil {
		t.Fatalf("RetryJoin: %v", err)
	}
	waitFor(t, 5*time.Second, "p1 to see p2", func() string { return membersDiff(p1, wantMembers(p1, p2)) })
}

// TestLeaveIntentOrdering drives the left-vs-dead bookkeeping directly with
// both arrival orders of a leave intent and memberlist's NotifyLeave.
func TestLeaveIntentOrdering(t *testing.T) {
	node := func(name string, meta Meta) *memberlist.Node {
		b, err := meta.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return &memberlist.Node{Name: name, Addr: net.IPv4(10, 0, 0, 9), Port: 7946, Meta: b}
	}
	for _, tc := range []struct {
		name       string
		intent     bool
		intentLast bool
		wantKinds  []EventKind
		wantState  string
	}{
		{"no intent: failure", false, false, []EventKind{EventJoin, EventDead}, StateDead},
		{"intent first: left", true, false, []EventKind{EventJoin, EventLeave}, StateLeft},
		{"intent overtaken: dead corrected to left", true, true, []EventKind{EventJoin, EventDead, EventLeave}, StateLeft},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, fastConfig("self", coordMeta("c1")))
			meta := agentMeta("x")
			d := delegate{p: p.Pool}
			d.NotifyJoin(node("x", meta))
			intent := newIntentBroadcast(leaveIntent{Name: "x", Nonce: 42}).Message()
			if tc.intent && !tc.intentLast {
				d.NotifyMsg(intent)
			}
			d.NotifyLeave(node("x", meta))
			if tc.intent && tc.intentLast {
				d.NotifyMsg(intent)
				d.NotifyMsg(intent) // duplicates are ignored
			}
			want := Member{Name: "x", Addr: "10.0.0.9:7946", State: tc.wantState, Meta: meta}
			waitFor(t, 2*time.Second, "events for x", func() string {
				var kinds []EventKind
				for _, ev := range p.rec.all() {
					if ev.Member.Name == "x" {
						kinds = append(kinds, ev.Kind)
					}
				}
				return cmp.Diff(tc.wantKinds, kinds)
			})
			if d := membersDiff(p, append(wantMembers(p), want)); d != "" {
				t.Error(d)
			}
		})
	}
}
