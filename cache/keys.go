package cache

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

// ErrKeyPermissions refuses a secret key file others can read.
var ErrKeyPermissions = errors.New("secret key file is readable by group or others")

// GenerateKey makes a signing key pair in the format of
// `nix-store --generate-binary-cache-key`: "name:base64" for both halves.
func GenerateKey(name string) (secret, public string, err error) {
	if name == "" || strings.ContainsAny(name, ": \n") {
		return "", "", fmt.Errorf("key name %q: must be non-empty without ':' or spaces", name)
	}
	sk, pk, err := signature.GenerateKeypair(name, rand.Reader)
	if err != nil {
		return "", "", err
	}
	return sk.String(), pk.String(), nil
}

// WriteKeyFiles writes a new key pair: the secret one readable by the owner
// only. Existing files are not overwritten.
func WriteKeyFiles(name, secretPath, publicPath string) (public string, err error) {
	secret, public, err := GenerateKey(name)
	if err != nil {
		return "", err
	}
	if err := writeNew(secretPath, secret+"\n", 0o600); err != nil {
		return "", err
	}
	if err := writeNew(publicPath, public+"\n", 0o644); err != nil {
		return "", err
	}
	return public, nil
}

func writeNew(path, data string, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Signer signs narinfo with the cluster's secret key.
type Signer struct {
	sk signature.SecretKey
}

// LoadSigner reads a secret key file, refusing one that group or others may read.
func LoadSigner(path string) (*Signer, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if info.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s (mode %v): %w", path, info.Mode().Perm(), ErrKeyPermissions)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	sk, err := signature.LoadSecretKey(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("secret key in %s: %w", path, err)
	}
	return &Signer{sk: sk}, nil
}

// PublicKey is the "name:base64" public key clients put in trusted-public-keys.
func (s *Signer) PublicKey() string { return s.sk.ToPublicKey().String() }

// Sign replaces ni's signatures with one by this key over its fingerprint.
func (s *Signer) Sign(ni *narinfo.NarInfo) error {
	sig, err := s.sk.Sign(rand.Reader, ni.Fingerprint())
	if err != nil {
		return err
	}
	ni.Signatures = []signature.Signature{sig}
	return nil
}

// Verify reports whether ni carries a valid signature by one of pubKeys.
func Verify(ni *narinfo.NarInfo, pubKeys ...string) (bool, error) {
	var pks []signature.PublicKey
	for _, k := range pubKeys {
		pk, err := signature.ParsePublicKey(k)
		if err != nil {
			return false, fmt.Errorf("public key %q: %w", k, err)
		}
		pks = append(pks, pk)
	}
	return signature.VerifyFirst(ni.Fingerprint(), ni.Signatures, pks), nil
}
