package cache

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"slices"
	"strconv"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// MaxNarInfoBytes bounds a narinfo body.
const MaxNarInfoBytes = 64 << 10

// ParseNarInfo reads a narinfo (at most MaxNarInfoBytes) with go-nix and
// checks it. Errors wrap raftfsm.ErrInvalid or raftfsm.ErrTooLarge.
func ParseNarInfo(r io.Reader) (*narinfo.NarInfo, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxNarInfoBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > MaxNarInfoBytes {
		return nil, fmt.Errorf("%w: narinfo over %d bytes", raftfsm.ErrTooLarge, MaxNarInfoBytes)
	}
	if bytes.IndexByte(b, 0) >= 0 || bytes.IndexByte(b, '\r') >= 0 {
		return nil, fmt.Errorf("%w: narinfo contains NUL or CR", raftfsm.ErrInvalid)
	}
	ni, err := narinfo.Parse(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%w: narinfo: %v", raftfsm.ErrInvalid, err)
	}
	if err := ni.Check(); err != nil {
		return nil, fmt.Errorf("%w: narinfo: %v", raftfsm.ErrInvalid, err)
	}
	if ni.NarHash == nil || ni.FileHash == nil {
		return nil, fmt.Errorf("%w: narinfo needs NarHash and FileHash", raftfsm.ErrInvalid)
	}
	return ni, nil
}

// ToRecord turns a parsed narinfo into the replicated record, with hashes
// in sha256:<nixbase32> form, sorted references and the blob name. The
// record is validated as Apply will validate it.
func ToRecord(ni *narinfo.NarInfo) (*pb.NarInfo, error) {
	if ni.FileHash == nil || ni.NarHash == nil {
		return nil, fmt.Errorf("%w: narinfo needs NarHash and FileHash", raftfsm.ErrInvalid)
	}
	if ni.FileHash.Algo() != nixhash.SHA256 || ni.NarHash.Algo() != nixhash.SHA256 {
		return nil, fmt.Errorf("%w: narinfo hashes must be sha256", raftfsm.ErrInvalid)
	}
	rec := &pb.NarInfo{
		StorePath:   ni.StorePath,
		Url:         ni.URL,
		Compression: ni.Compression,
		FileHash:    ni.FileHash.Format(nixhash.NixBase32, true),
		FileSize:    ni.FileSize,
		NarHash:     ni.NarHash.Format(nixhash.NixBase32, true),
		NarSize:     ni.NarSize,
		References:  slices.Sorted(slices.Values(ni.References)),
		Deriver:     ni.Deriver,
		System:      ni.System,
		Ca:          ni.CA,
		Blob:        hex.EncodeToString(ni.FileHash.Digest()),
	}
	rec.References = slices.Compact(rec.References)
	for _, s := range ni.Signatures {
		rec.Sigs = append(rec.Sigs, s.String())
	}
	if err := raftfsm.ValidateNarInfo(rec); err != nil {
		return nil, err
	}
	return rec, nil
}

// FromRecord is the go-nix form of a record (for signing and verifying).
func FromRecord(rec *pb.NarInfo) (*narinfo.NarInfo, error) {
	fh, err := nixhash.ParseAny(rec.FileHash, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: FileHash: %v", raftfsm.ErrInvalid, err)
	}
	nh, err := nixhash.ParseAny(rec.NarHash, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: NarHash: %v", raftfsm.ErrInvalid, err)
	}
	ni := &narinfo.NarInfo{
		StorePath: rec.StorePath, URL: rec.Url, Compression: rec.Compression,
		FileHash: fh, FileSize: rec.FileSize, NarHash: nh, NarSize: rec.NarSize,
		References: rec.References, Deriver: rec.Deriver, System: rec.System, CA: rec.Ca,
	}
	for _, s := range rec.Sigs {
		sig, err := signature.ParseSignature(s)
		if err != nil {
			return nil, fmt.Errorf("%w: Sig: %v", raftfsm.ErrInvalid, err)
		}
		ni.Signatures = append(ni.Signatures, sig)
	}
	return ni, nil
}

// SignRecord replaces rec's signatures with the cluster key's.
func (s *Signer) SignRecord(rec *pb.NarInfo) error {
	ni, err := FromRecord(rec)
	if err != nil {
		return err
	}
	if err := s.Sign(ni); err != nil {
		return err
	}
	rec.Sigs = rec.Sigs[:0]
	for _, sig := range ni.Signatures {
		rec.Sigs = append(rec.Sigs, sig.String())
	}
	return nil
}

// AppendNarInfo appends the .narinfo text of a record to b.
func AppendNarInfo(b []byte, rec *pb.NarInfo) []byte {
	b = append(b, "StorePath: "...)
	b = append(b, rec.StorePath...)
	b = append(b, "\nURL: "...)
	b = append(b, rec.Url...)
	b = append(b, "\nCompression: "...)
	b = append(b, rec.Compression...)
	b = append(b, "\nFileHash: "...)
	b = append(b, rec.FileHash...)
	b = append(b, "\nFileSize: "...)
	b = strconv.AppendUint(b, rec.FileSize, 10)
	b = append(b, "\nNarHash: "...)
	b = append(b, rec.NarHash...)
	b = append(b, "\nNarSize: "...)
	b = strconv.AppendUint(b, rec.NarSize, 10)
	b = append(b, "\nReferences:"...)
	if len(rec.References) == 0 {
		b = append(b, ' ')
	}
	for _, r := range rec.References {
		b = append(b, ' ')
		b = append(b, r...)
	}
	b = append(b, '\n')
	if rec.Deriver != "" {
		b = append(b, "Deriver: "...)
		b = append(b, rec.Deriver...)
		b = append(b, '\n')
	}
	if rec.System != "" {
		b = append(b, "System: "...)
		b = append(b, rec.System...)
		b = append(b, '\n')
	}
	for _, s := range rec.Sigs {
		b = append(b, "Sig: "...)
		b = append(b, s...)
		b = append(b, '\n')
	}
	if rec.Ca != "" {
		b = append(b, "CA: "...)
		b = append(b, rec.Ca...)
		b = append(b, '\n')
	}
	return b
}

// validHashPart checks the "<hash>" of a "<hash>.narinfo" URL path.
func validHashPart(h string) bool { return validHashPartBytes(h) }

// validHashPartBytes is validHashPart for the fast path's bytes.
func validHashPartBytes[T string | []byte](h T) bool {
	if len(h) != 32 {
		return false
	}
	for i := range len(h) {
		if !nixbase32.Is(h[i]) {
			return false
		}
	}
	return true
}
