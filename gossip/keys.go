package gossip

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrInsecureKeyFile is returned (wrapped) when the key file can be read or
// written by its group or by others.
var ErrInsecureKeyFile = errors.New("gossip: key file is accessible by group or others")

// maxKeyFileSize bounds how much of a key file is read.
const maxKeyFileSize = 64 << 10

// readKeyFile reads and parses path, returning the keys (primary first) and
// the raw content, for change detection.
func readKeyFile(path string) ([][]byte, []byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("gossip: key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("gossip: key file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, nil, fmt.Errorf("gossip: key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, nil, fmt.Errorf("%w: %s has mode %#o, want 0600 or stricter", ErrInsecureKeyFile, path, perm)
	}
	raw, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("gossip: key file %s: %w", path, err)
	}
	if len(raw) > maxKeyFileSize {
		return nil, nil, fmt.Errorf("gossip: key file %s is larger than %d bytes", path, maxKeyFileSize)
	}
	keys, err := parseKeys(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("gossip: key file %s: %w", path, err)
	}
	return keys, raw, nil
}

// parseKeys decodes one base64 key per line; blank lines and lines starting
// with '#' are skipped, duplicates dropped. The first key is the primary.
// Errors never include key material.
func parseKeys(raw []byte) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			key, err = base64.RawStdEncoding.DecodeString(line)
		}
		if err != nil {
			return nil, fmt.Errorf("line %d: not valid base64", n)
		}
		if err := memberlist.ValidateKey(key); err != nil {
			return nil, fmt.Errorf("line %d: key is %d bytes, want 16, 24 or 32", n, len(key))
		}
		dup := false
		for _, k := range keys {
			dup = dup || bytes.Equal(k, key)
		}
		if !dup {
			keys = append(keys, key)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, errors.New("no keys")
	}
	return keys, nil
}

// ReloadKeys re-reads Config.KeyFile and makes the keyring match it: every
// listed key is installed, the first becomes the primary (the one used to
// encrypt), and keys no longer listed are removed. If the file can't be
// read, is accessible by group or others, or holds an invalid key, the
// keyring is left unchanged.
//
// To rotate without dropping traffic, list the new key second everywhere,
// then first everywhere, then drop the old one.
func (p *Pool) ReloadKeys() error {
	if p.keyring == nil {
		return errors.New("gossip: no key file configured")
	}
	p.keyMu.Lock()
	defer p.keyMu.Unlock()
	keys, raw, err := readKeyFile(p.cfg.KeyFile)
	if err != nil {
		return err
	}
	return p.installKeysLocked(keys, raw)
}

func (p *Pool) installKeysLocked(keys [][]byte, raw []byte) error {
	for _, k := range keys {
		if err := p.keyring.AddKey(k); err != nil {
			return fmt.Errorf("gossip: installing key: %w", err)
		}
	}
	if err := p.keyring.UseKey(keys[0]); err != nil {
		return fmt.Errorf("gossip: switching primary key: %w", err)
	}
	for _, old := range p.keyring.GetKeys() {
		keep := false
		for _, k := range keys {
			keep = keep || bytes.Equal(k, old)
		}
		if !keep {
			if err := p.keyring.RemoveKey(old); err != nil {
				return fmt.Errorf("gossip: removing key: %w", err)
			}
		}
	}
	p.keyFileContent = raw
	p.keyErr = ""
	return nil
}

// reloadKeysLoop polls the key file every interval and reinstalls the keys
// when its content changed. Errors are logged once per distinct error.
func (p *Pool) reloadKeysLoop(every time.Duration) {
	defer p.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		p.keyMu.Lock()
		keys, raw, err := readKeyFile(p.cfg.KeyFile)
		switch {
		case err != nil:
			if msg := err.Error(); msg != p.keyErr {
				p.keyErr = msg
				p.log.Error("gossip: key file reload failed; keeping current keys", "err", err)
			}
		case bytes.Equal(raw, p.keyFileContent):
			p.keyErr = ""
		default:
			if err := p.installKeysLocked(keys, raw); err != nil {
				p.log.Error("gossip: key file reload failed", "err", err)
			} else {
				p.log.Info("gossip: reloaded encryption keys", "keys", len(keys))
			}
		}
		p.keyMu.Unlock()
	}
}
