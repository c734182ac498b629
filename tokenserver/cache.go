package tokenserver

import (
	"container/list"
	"crypto/sha256"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/identityd/identityd/internal/registry"
)

// DefaultTokenCacheBytes bounds the tokens cached (Config.TokenCacheBytes):
// some 10,000 RS256 tokens, an hour of every audience of a busy host.
const DefaultTokenCacheBytes = 16 << 20

// maxCachedTokenBytes: a larger entry (a request naming many or long
// audiences) is signed every time rather than crowding out the others.
const maxCachedTokenBytes = 16 << 10

// CurrentKey is a KeySet that says which key signs now (*Keys does). The
// token cache needs it to drop tokens once another key signs: a KeySet
// without it gets no cache.
type CurrentKey interface {
	// SigningKeyID is the kid of the key that signs now; empty if none.
	SigningKeyID() string
}

// tokenCache keeps signed tokens for reuse: per sandbox (as the registry
// knows it, cgroup and netns included, so that a sandbox recreated under
// the same id is another), secret shown (so that a rotated secret's
// successor is never answered with a token asked for with the old one),
// audience list and lifetime. A token is reused while more than half of
// its lifetime remains, the key that signed it still signs, and its exp is
// within the keys' guaranteed publication. It is bounded in bytes, least
// recently used out first, and safe for concurrent use.
type tokenCache struct {
	maxBytes int

	mu        sync.Mutex
	bytes     int
	lru       list.List // of *cachedToken, most recently used first
	byKey     map[cacheKey]*list.Element
	bySandbox map[string]map[*list.Element]struct{}
	// kid is the key that signed every entry: once another signs, all go.
	kid string
	// forgets counts Forget calls: a token signed across one is not kept
	// (see generation).
	forgets uint64
}

type cacheKey struct {
	sandbox  registry.Sandbox
	secret   [sha256.Size]byte
	audience string // length-prefixed, so that no two lists meet
	ttl      time.Duration
}

type cachedToken struct {
	key      cacheKey
	token    string
	claims   Claims
	alg, kid string
	size     int
}

func newTokenCache(maxBytes int) *tokenCache {
	return &tokenCache{maxBytes: maxBytes, byKey: map[cacheKey]*list.Element{},
		bySandbox: map[string]map[*list.Element]struct{}{}}
}

func newCacheKey(sb registry.Sandbox, secret string, aud []string, ttl time.Duration) cacheKey {
	var b strings.Builder
	for _, a := range aud {
		b.WriteString(strconv.Itoa(len(a)))
		b.WriteByte(':')
		b.WriteString(a)
	}
	return cacheKey{sandbox: sb, secret: sha256.Sum256([]byte(secret)), audience: b.String(), ttl: ttl}
}

// generation is taken before a request's secret is checked, and handed
// back to put: a Forget in between (a deletion or rotation that the check
// may have preceded) keeps the token out of the cache.
func (c *tokenCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.forgets
}

// get returns the cached token for k if it may be reused at now: kid is the
// key that signs now and until the keys' guaranteed publication.
func (c *tokenCache) get(k cacheKey, kid string, now, until int64) (*cachedToken, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if kid != c.kid {
		c.clearLocked()
		c.kid = kid
		return nil, false
	}
	e, ok := c.byKey[k]
	if !ok {
		return nil, false
	}
	t := e.Value.(*cachedToken)
	cl := t.claims
	// Reused only in the first half of its lifetime (so that a client
	// renewing at half-life, to the second, gets a fresh one), never
	// before its iat (a clock set back), never past what the keys
	// guarantee.
	if now < cl.IssuedAt || 2*(cl.Expiry-now) <= cl.Expiry-cl.IssuedAt || cl.Expiry > until {
		c.removeLocked(e)
		return nil, false
	}
	c.lru.MoveToFront(e)
	return t, true
}

// put caches t unless a Forget came after gen or another key signs now.
func (c *tokenCache) put(t *cachedToken, gen uint64) {
	t.size = len(t.token) + len(t.key.audience) + len(t.key.sandbox.ID) + len(t.key.sandbox.App) +
		len(t.key.sandbox.Org) + len(t.key.sandbox.CgroupPath) + 256
	if t.size > maxCachedTokenBytes || t.size > c.maxBytes {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.forgets || t.kid != c.kid {
		return
	}
	if e, ok := c.byKey[t.key]; ok {
		c.removeLocked(e)
	}
	e := c.lru.PushFront(t)
	c.byKey[t.key] = e
	id := t.key.sandbox.ID
	if c.bySandbox[id] == nil {
		c.bySandbox[id] = map[*list.Element]struct{}{}
	}
	c.bySandbox[id][e] = struct{}{}
	c.bytes += t.size
	for c.bytes > c.maxBytes {
		c.removeLocked(c.lru.Back())
	}
}

// forget drops every token of sandbox id.
func (c *tokenCache) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgets++
	for e := range c.bySandbox[id] {
		c.removeLocked(e)
	}
}

func (c *tokenCache) removeLocked(e *list.Element) {
	t := c.lru.Remove(e).(*cachedToken)
	delete(c.byKey, t.key)
	id := t.key.sandbox.ID
	delete(c.bySandbox[id], e)
	if len(c.bySandbox[id]) == 0 {
		delete(c.bySandbox, id)
	}
	c.bytes -= t.size
}

func (c *tokenCache) clearLocked() {
	c.lru.Init()
	clear(c.byKey)
	clear(c.bySandbox)
	c.bytes = 0
}

// len is the number of tokens cached.
func (c *tokenCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}
