// Package credsdir keeps the directory through which a sandbox reads its
// credentials: a file always holding its current bearer secret, and a file
// always holding a fresh identity token.
//
// Each sandbox has one directory, <root>/<id>, which is bind-mounted into
// the sandbox (a directory, never a single file: a rename inside a
// bind-mounted directory is seen through the mount, whereas a bind-mounted
// file stays bound to the inode it was mounted with and would never show a
// replacement). Every file in it is replaced by an atomic rename, so a
// reader sees the old content or the new one, never a torn or empty file.
//
// The files hold plaintext: that is their purpose. On the host they are out
// of reach of everyone but root, since <root> is 0700; inside the sandbox
// the directory is 0750 and the files 0640, root's and the group the
// sandbox's workload runs as.
//
// A secret rotation stages the next secret in <root>/.staged/<id>, outside
// the mounted directory, commits it in the secret store, and only then
// renames it into place (Publish). Recover finishes or abandons a rotation
// a crash interrupted, by whether the store committed it.
package credsdir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/identityd/identityd/internal/atomicfile"
)

// The names of the files in a sandbox's directory.
const (
	SecretFile = "secret"
	TokenFile  = "token"
)

// stagedDir holds secrets of rotations in flight, outside every sandbox's
// mounted directory.
const stagedDir = ".staged"

// Modes of a sandbox's directory and files: root's, readable by one group.
const (
	dirMode  = 0o750
	fileMode = 0o640
)

// dirName is the directory of the sandboxes' credentials within a daemon's
// state directory.
const dirName = "credentials"

// Root is where a daemon whose state lives in stateDir keeps the sandboxes'
// credentials directories.
func Root(stateDir string) string { return filepath.Join(stateDir, dirName) }

// Dirs is the set of sandboxes' credentials directories under one root.
type Dirs struct {
	root string
}

// Open opens (creating if needed) the credentials root, and removes the
// leftovers of writes a crash interrupted.
func Open(root string) (*Dirs, error) {
	d := &Dirs{root: root}
	for _, p := range []string{root, filepath.Join(root, stagedDir)} {
		if err := atomicfile.MkdirPrivate(p); err != nil {
			return nil, fmt.Errorf("open credentials directories: %w", err)
		}
		if err := atomicfile.RemoveTemps(p); err != nil {
			return nil, fmt.Errorf("open credentials directories: %w", err)
		}
	}
	ids, err := d.IDs()
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if err := atomicfile.RemoveTemps(d.Path(id)); err != nil {
			return nil, fmt.Errorf("open credentials directories: %w", err)
		}
	}
	return d, nil
}

// At is the credentials root as it is: nothing is created or cleaned up,
// so that a check such as fsck only reads.
func At(root string) *Dirs { return &Dirs{root: root} }

// Path is sandbox id's directory: what is mounted into the sandbox. id must
// be a valid sandbox id (the caller checks it).
func (d *Dirs) Path(id string) string { return filepath.Join(d.root, id) }

func (d *Dirs) staged(id string) string { return filepath.Join(d.root, stagedDir, id) }

// IDs lists the sandboxes that have a directory.
func (d *Dirs) IDs() ([]string, error) {
	entries, err := os.ReadDir(d.root)
	if err != nil {
		return nil, fmt.Errorf("list credentials directories: %w", err)
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// Create makes sandbox id's directory, readable by group gid, holding
// secret. An existing directory is refused: it is not this sandbox's.
func (d *Dirs) Create(id string, gid uint32, secret string) error {
	p := d.Path(id)
	if err := os.Mkdir(p, dirMode); err != nil {
		return fmt.Errorf("create credentials directory %s: %w", p, err)
	}
	// Mkdir's mode is filtered by the umask.
	if err := os.Chown(p, 0, int(gid)); err != nil {
		return fmt.Errorf("create credentials directory %s: %w", p, err)
	}
	if err := os.Chmod(p, dirMode); err != nil {
		return fmt.Errorf("create credentials directory %s: %w", p, err)
	}
	if err := atomicfile.SyncDir(d.root); err != nil {
		return err
	}
	return d.write(id, SecretFile, []byte(secret+"\n"))
}

// Group is the group that may read sandbox id's files.
func (d *Dirs) Group(id string) (uint32, error) {
	st, err := os.Lstat(d.Path(id))
	if err != nil {
		return 0, fmt.Errorf("credentials directory of %s: %w", id, err)
	}
	if !st.IsDir() {
		return 0, fmt.Errorf("credentials directory of %s is not a directory", id)
	}
	return st.Sys().(*syscall.Stat_t).Gid, nil
}

// write atomically replaces one of sandbox id's files. The directory must
// exist: a write racing with Remove never brings it back.
func (d *Dirs) write(id, name string, b []byte) error {
	gid, err := d.Group(id)
	if err != nil {
		return err
	}
	return atomicfile.WriteFileGroup(filepath.Join(d.Path(id), name), b, fileMode, int(gid))
}

func (d *Dirs) read(id, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(d.Path(id), name))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// Secret reads sandbox id's published secret.
func (d *Dirs) Secret(id string) (string, error) { return d.read(id, SecretFile) }

// Stage durably keeps next as sandbox id's next secret, out of the
// sandbox's sight, until Publish or Discard.
func (d *Dirs) Stage(id, next string) error {
	gid, err := d.Group(id)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFileGroup(d.staged(id), []byte(next+"\n"), fileMode, int(gid)); err != nil {
		return fmt.Errorf("stage next secret of %s: %w", id, err)
	}
	return nil
}

// Staged returns sandbox id's staged secret, if a rotation is in flight.
func (d *Dirs) Staged(id string) (string, bool, error) {
	b, err := os.ReadFile(d.staged(id))
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("read staged secret of %s: %w", id, err)
	}
	return strings.TrimSpace(string(b)), true, nil
}

// Publish moves sandbox id's staged secret into its directory, in one
// rename, and makes that durable.
func (d *Dirs) Publish(id string) error {
	if err := os.Rename(d.staged(id), filepath.Join(d.Path(id), SecretFile)); err != nil {
		return fmt.Errorf("publish secret of %s: %w", id, err)
	}
	if err := atomicfile.SyncDir(d.Path(id)); err != nil {
		return err
	}
	return atomicfile.SyncDir(filepath.Join(d.root, stagedDir))
}

// Discard drops sandbox id's staged secret, if any.
func (d *Dirs) Discard(id string) error {
	if err := atomicfile.Remove(d.staged(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("discard staged secret of %s: %w", id, err)
	}
	return nil
}

// StagedIDs lists the sandboxes with a rotation in flight.
func (d *Dirs) StagedIDs() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(d.root, stagedDir))
	if err != nil {
		return nil, fmt.Errorf("list staged secrets: %w", err)
	}
	var ids []string
	for _, e := range entries {
		if !atomicfile.IsTemp(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// WriteToken replaces sandbox id's token file.
func (d *Dirs) WriteToken(id, token string) error {
	if err := d.write(id, TokenFile, []byte(token+"\n")); err != nil {
		return fmt.Errorf("write token file of %s: %w", id, err)
	}
	return nil
}

// Token reads sandbox id's token file and the times it claims.
func (d *Dirs) Token(id string) (string, Times, error) {
	tok, err := d.read(id, TokenFile)
	if err != nil {
		return "", Times{}, err
	}
	t, err := TimesOf(tok)
	return tok, t, err
}

// Remove deletes sandbox id's directory and staged secret. A missing one
// is not an error.
func (d *Dirs) Remove(id string) error {
	p := d.Path(id)
	if err := os.RemoveAll(p); err != nil {
		return fmt.Errorf("remove credentials directory %s: %w", p, err)
	}
	if err := d.Discard(id); err != nil {
		return err
	}
	return atomicfile.SyncDir(d.root)
}

// Times are a token's iat and exp.
type Times struct {
	Issued, Expires time.Time
}

// RefreshAt is when a token should be replaced: at half its lifetime.
func (t Times) RefreshAt() time.Time { return t.Issued.Add(t.Expires.Sub(t.Issued) / 2) }

// tokenAlgs are the algorithms a token file may be signed with: those the
// daemon signs with. The signature is not checked: the daemon wrote the
// file, and only reads when to replace it.
var tokenAlgs = []jose.SignatureAlgorithm{jose.RS256, jose.ES256, jose.EdDSA}

// TimesOf reads iat and exp from a token without verifying it.
func TimesOf(token string) (Times, error) {
	parsed, err := jwt.ParseSigned(token, tokenAlgs)
	if err != nil {
		return Times{}, fmt.Errorf("parse token: %w", err)
	}
	var c jwt.Claims
	if err := parsed.UnsafeClaimsWithoutVerification(&c); err != nil {
		return Times{}, fmt.Errorf("parse token claims: %w", err)
	}
	if c.IssuedAt == nil || c.Expiry == nil {
		return Times{}, errors.New("token has no iat or exp")
	}
	return Times{Issued: c.IssuedAt.Time(), Expires: c.Expiry.Time()}, nil
}
