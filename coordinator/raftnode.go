package coordinator

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// nodeID returns the configured ID, or the one kept in the data dir, or a
// new one (which is then kept).
func nodeID(cfg *Config) (string, error) {
	path := filepath.Join(cfg.DataDir, "node-id")
	if b, err := os.ReadFile(path); err == nil {
		kept := strings.TrimSpace(string(b))
		if cfg.NodeID != "" && cfg.NodeID != kept {
			return "", fmt.Errorf("data dir %s belongs to node %q, not %q", cfg.DataDir, kept, cfg.NodeID)
		}
		return kept, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	id := cfg.NodeID
	if id == "" {
		b := make([]byte, 6)
		if _, err := rand.Read(b); err != nil {
			return "", err
		}
		id = "node-" + hex.EncodeToString(b)
	}
	if err := writeFileSync(path, []byte(id+"\n"), 0o600); err != nil {
		return "", err
	}
	return id, nil
}

func writeFileSync(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// advertised turns a bound address into one peers can dial.
func advertised(explicit string, bound net.Addr) (string, error) {
	if explicit != "" {
		return explicit, nil
	}
	host, port, err := net.SplitHostPort(bound.String())
	if err != nil {
		return "", err
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

type raftParts struct {
	raft   *raft.Raft
	store  *raftboltdb.BoltStore
	trans  *raft.NetworkTransport
	notify chan bool
}

func (c *Coordinator) startRaft() (*raftParts, error) {
	cfg := &c.cfg
	dir := filepath.Join(cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	hl := hclogAdapter(c.log, "raft")
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(c.id)
	rc.Logger = hl
	rc.BatchApplyCh = true
	rc.MaxAppendEntries = 256
	if cfg.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	}
	if cfg.ElectionTimeout > 0 {
		rc.ElectionTimeout = cfg.ElectionTimeout
	}
	if cfg.LeaderLeaseTimeout > 0 {
		rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	}
	if cfg.CommitTimeout > 0 {
		rc.CommitTimeout = cfg.CommitTimeout
	}
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
	}
	if cfg.TrailingLogs > 0 {
		rc.TrailingLogs = cfg.TrailingLogs
	}
	if cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = cfg.SnapshotInterval
	}
	notify := make(chan bool, 16)
	rc.NotifyCh = notify

	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(dir, "raft.db")})
	if err != nil {
		return nil, fmt.Errorf("open raft store: %w", err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, hl)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	ln, err := net.Listen("tcp", cfg.RaftAddr)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("listen on raft address: %w", err)
	}
	adv, err := advertised(cfg.AdvertiseRaft, ln.Addr())
	if err != nil {
		ln.Close()
		store.Close()
		return nil, err
	}
	advAddr, err := net.ResolveTCPAddr("tcp", adv)
	if err != nil {
		ln.Close()
		store.Close()
		return nil, fmt.Errorf("raft advertise address: %w", err)
	}
	trans := raft.NewNetworkTransportWithLogger(&tcpStream{ln: ln, adv: advAddr}, 5, 10*time.Second, hl)
	c.raftAddr = adv

	if cfg.Bootstrap {
		has, err := raft.HasExistingState(store, store, snaps)
		if err != nil {
			trans.Close()
			store.Close()
			return nil, err
		}
		if !has {
			conf := raft.Configuration{Servers: []raft.Server{{ID: rc.LocalID, Address: raft.ServerAddress(adv), Suffrage: raft.Voter}}}
			if err := raft.BootstrapCluster(rc, store, store, snaps, trans, conf); err != nil {
				trans.Close()
				store.Close()
				return nil, fmt.Errorf("bootstrap: %w", err)
			}
		}
	}
	// Recent entries are served from memory, not read back from bolt, when
	// the FSM and replication need them.
	logs, err := raft.NewLogCache(1024, store)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, err
	}
	r, err := raft.NewRaft(rc, c.fsm, logs, store, snaps, trans)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, err
	}
	return &raftParts{raft: r, store: store, trans: trans, notify: notify}, nil
}

// tcpStream is raft's StreamLayer over a listener we opened (so ":0" works
// and the advertised address can differ from the bound one).
type tcpStream struct {
	ln  net.Listener
	adv net.Addr
}

func (t *tcpStream) Accept() (net.Conn, error) { return t.ln.Accept() }
func (t *tcpStream) Close() error              { return t.ln.Close() }
func (t *tcpStream) Addr() net.Addr            { return t.adv }
func (t *tcpStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return net.DialTimeout("tcp", string(address), timeout)
}
