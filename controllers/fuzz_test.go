package controllers

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzAdminRequest feeds arbitrary bodies through the admin API's decoding
// and the checks every create and adoption passes before anything is made.
// (The kernel side of Create and Adopt is covered by the real tests.)
func FuzzAdminRequest(f *testing.F) {
	for _, seed := range []string{
		`{"app":"web"}`, `{"id":"a","app":"web","org":"acme"}`, `{"app":"we:b"}`, `{"id":"../x","app":"a"}`,
		`{"app":"web","cgroup_path":"/sys/fs/cgroup/x"}`, `{"app":"web","netns_path":"/proc/self/ns/net"}`,
		`{"app":"web","netns_path":"/etc/hostname"}`, `{"app":"web","bogus":1}`, `[]`, `{`, `{"app":"` + strings.Repeat("a", 200) + `"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, adopt := range []bool{false, true} {
			rec := httptest.NewRecorder()
			req := httptest.NewRequest("POST", "/", bytes.NewReader(body))
			var cr AdoptRequest
			if !decode(rec, req, &cr) {
				if rec.Code != 400 || !json.Valid(rec.Body.Bytes()) {
					t.Fatalf("bad JSON body answered %d %q", rec.Code, rec.Body.String())
				}
				continue
			}
			if validate(cr.ID, cr.App, cr.Org) != nil {
				continue
			}
			for _, v := range []string{cr.ID, cr.App, cr.Org} {
				if strings.ContainsAny(v, ":/\x00") || strings.HasPrefix(v, ".") {
					t.Fatalf("validated %q", v)
				}
			}
			if adopt && (cr.CgroupPath != "" || cr.NetnsPath != "") {
				if r, err := adoptRecord(cr); err == nil && r.CgroupPath == "" && r.NetnsPath == "" {
					t.Fatal("an adoption with nothing to tie callers to")
				}
			}
		}
	})
}

// FuzzRecordFile throws arbitrary bytes at the record reader the rebuild
// uses: it never panics, and never trusts a record under another name.
func FuzzRecordFile(f *testing.F) {
	f.Add([]byte(`{"id":"x","app":"web","cgroup_path":"/sys/fs/cgroup/x","cgroup_id":5,"owned":true,"created":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"id":"y","app":"web"}`))
	f.Add([]byte(`{"id":"x","addresses":["10.0.0.2/24"]}`))
	f.Add([]byte(`{"id":"x","addresses":["nope"]}`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, body []byte) {
		if err := os.WriteFile(filepath.Join(dir, "x.json"), body, 0o600); err != nil {
			t.Fatal(err)
		}
		recs, errs := list(dir)
		for _, r := range recs {
			if r.ID != "x" {
				t.Fatalf("record under x.json names %q", r.ID)
			}
		}
		if len(recs)+len(errs) != 1 {
			t.Fatalf("one file gave %d records and %d errors", len(recs), len(errs))
		}
	})
}
