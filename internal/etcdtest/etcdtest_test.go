package etcdtest

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestClusterSurvivesMemberLoss checks the harness itself: a 3-member
// cluster serves writes, keeps serving with one member killed, refuses with
// two gone, and recovers when they are restarted.
func TestClusterSurvivesMemberLoss(t *testing.T) {
	c := Start(t, 3)
	cli := c.Client(t)
	// put retries for a while: losing the leader costs an election.
	put := func(v string) error {
		var err error
		for start := time.Now(); time.Since(start) < 10*time.Second; {
			ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(context.Background()), 2*time.Second)
			_, err = cli.Put(ctx, "/etcdtest/k", v)
			cancel()
			if err == nil {
				t.Logf("put %s after %s", v, time.Since(start).Round(time.Millisecond))
				return nil
			}
			t.Logf("put %s: %v", v, err)
			time.Sleep(200 * time.Millisecond)
		}
		return err
	}
	if err := put("a"); err != nil {
		t.Fatalf("put with 3 members: %v", err)
	}
	c.Kill(0)
	if err := put("b"); err != nil {
		t.Fatalf("put with 2 of 3 members: %v", err)
	}
	c.Stop(1)
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(context.Background()), 2*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/etcdtest/k", "c"); err == nil {
		t.Fatal("put with 1 of 3 members succeeded")
	} else {
		t.Logf("put with 1 of 3 members: %v", err)
	}
	c.Restart(0)
	c.Restart(1)
	if err := put("d"); err != nil {
		t.Fatalf("put after restarts: %v", err)
	}
	if c.Running(0) != true || c.Running(2) != true {
		t.Fatal("members not running after restart")
	}
}

// The unix socket endpoints reach the cluster without any network: they are
// what daemons in other network namespaces use.
func TestUnixEndpoints(t *testing.T) {
	c := Start(t, 1)
	eps := c.UnixEndpoints()
	if len(eps) != 1 {
		t.Fatalf("unix endpoints: %v", eps)
	}
	cli, err := c.newClient(eps)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/etcdtest/unix", "x"); err != nil {
		t.Fatalf("put over %v: %v", eps, err)
	}
}
