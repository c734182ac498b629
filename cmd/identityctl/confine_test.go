package main

import (
	"os/user"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestResolveUser(t *testing.T) {
	nobodyIDs := identity{nobodyID, nobodyID}
	if u, err := user.Lookup(nobody); err == nil {
		var ierr error
		nobodyIDs, ierr = idsOf(u)
		require.NoError(t, ierr)
	}
	for _, tc := range []struct {
		spec string
		want identity
	}{
		{"", nobodyIDs},
		{"nobody", nobodyIDs},
		{"4000000", identity{4000000, 4000000}}, // unknown uid: the group of the same number
		{"4000000:4000001", identity{4000000, 4000001}},
		{"nobody:4000001", identity{nobodyIDs.uid, 4000001}},
	} {
		got, err := resolveUser(tc.spec)
		require.NoError(t, err, tc.spec)
		assert.Equal(t, tc.want, got, tc.spec)
	}
	for _, spec := range []string{
		"root", "0", "0:0", "4000000:0", "root:4000000", // root stays --privileged's
		":4000000", "4294967295", "4000000:4294967295", "-1", "no-such-user-x", "nobody:no-such-group-x",
	} {
		_, err := resolveUser(spec)
		assert.Error(t, err, spec)
	}
}
