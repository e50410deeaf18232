%% dist: messages between two nodes on this machine - one-way rate and
%% round-trip latency. The Erlang twin of dist.lua (which says what is
%% measured and the protocol); see BENCHMARKS.md.
%%
%% Run as two nodes (scripts/bench starts them with -sname and -setcookie):
%%   mode=server          registers bench, prints "ready node=<name>"
%%   mode=client peer=N   drives bench on node N (Erlang or Moonbeam) and
%%                        prints RESULT lines dist_rate, dist_rtt_p50,
%%                        dist_rtt_p99 (with suffix=S appended)
%% Args (key=value): n, rtts, reps, stop=1.
-module(dist).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    case arg(Args, "mode", "client") of
        "server" -> server();
        _ -> client(Args)
    end.

server() ->
    register(bench, self()),
    io:format("ready node=~s~n", [node()]),
    serve(0).

serve(Count) ->
    receive
        {msg, _, _} -> serve(Count + 1);
        {ping, From, I} -> From ! {pong, I}, serve(Count);
        {done, From} -> From ! {count, Count}, serve(0);
        stop -> erlang:halt(0)
    end.

client(Args) ->
    Peer = list_to_atom(arg(Args, "peer", "")),
    N = int(arg(Args, "n", "200000")),
    Rtts = int(arg(Args, "rtts", "10000")),
    Reps = int(arg(Args, "reps", "3")),
    Suffix = arg(Args, "suffix", ""),
    connect(Peer, 100),
    Dest = {bench, Peer},
    rate(Dest, max(1000, N div 10)),                    % warm-up
    rtts(Dest, max(100, Rtts div 10)),
    Rates = [rate(Dest, N) || _ <- lists:seq(1, Reps)],
    R = lists:nth((Reps + 1) div 2, lists:sort(Rates)),
    {P50, P99} = rtts(Dest, Rtts),
    io:format("detail ~s -> ~s: ~b msgs x ~b, median ~b msg/s (all: ~s); ~b round trips: p50 ~.1f us, p99 ~.1f us~n",
              [node(), Peer, N, Reps, round(R),
               lists:join(" ", [integer_to_list(round(V)) || V <- Rates]), Rtts, P50, P99]),
    io:format("RESULT name=dist_rate~s value=~b unit=msg/s~n", [Suffix, round(R)]),
    io:format("RESULT name=dist_rtt_p50~s value=~.1f unit=us~n", [Suffix, P50]),
    io:format("RESULT name=dist_rtt_p99~s value=~.1f unit=us~n", [Suffix, P99]),
    case arg(Args, "stop", "0") of
        "1" -> Dest ! stop, timer:sleep(100);
        _ -> ok
    end,
    erlang:halt(0).

connect(Peer, 0) -> io:format("cannot connect to ~s~n", [Peer]), erlang:halt(1);
connect(Peer, K) ->
    case net_kernel:connect_node(Peer) of
        true -> ok;
        _ -> timer:sleep(100), connect(Peer, K - 1)
    end.

rate(Dest, N) ->
    Payload = binary:copy(<<"p">>, 32),
    T0 = erlang:monotonic_time(microsecond),
    send_n(Dest, 1, N, Payload),
    Dest ! {done, self()},
    receive {count, N} -> ok after 120000 -> erlang:halt(2) end,
    N / ((erlang:monotonic_time(microsecond) - T0) / 1000000).

send_n(_, I, N, _) when I > N -> ok;
send_n(Dest, I, N, Payload) -> Dest ! {msg, I, Payload}, send_n(Dest, I + 1, N, Payload).

rtts(Dest, K) ->
    Lat = lists:sort([rtt(Dest, I) || I <- lists:seq(1, K)]),
    {lists:nth(K div 2 + 1, Lat), lists:nth(K * 99 div 100 + 1, Lat)}.

rtt(Dest, I) ->
    T0 = erlang:monotonic_time(nanosecond),
    Dest ! {ping, self(), I},
    receive {pong, I} -> ok after 10000 -> erlang:halt(3) end,
    (erlang:monotonic_time(nanosecond) - T0) / 1000.

int(S) -> list_to_integer(S).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> V;
        _ -> arg(Rest, Key, Default)
    end.
