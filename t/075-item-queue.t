# extend, release, complete and skip with the item's "queue_id" in the body
# (the statements that name the queue in every scan of items, which Citus
# needs to route them: t/citus/): the contract's statuses on plain
# PostgreSQL, each checked in the database (t/lib/AQ/ItemQueue.pm).
use strict;
use warnings;

use lib 't/lib';
use AQ;
use AQ::ItemQueue;
use Test::More;

AQ::ItemQueue::contract();

done_testing();
